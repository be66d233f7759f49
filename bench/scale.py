"""The data path at research scale: source -> sql -> dedup -> select, at 10k, 100k and 1M rows of
the scale corpus (bench/corpus.py: instruction-data lengths, 10 % planted near-duplicates, a 2 %
target family), each step's seconds, rows/s and peak RSS, with the field's libraries on the same
data in the same run.

The pipeline runs as a user runs it: one `datamill run` process per size (fresh workspace, no
MLflow), while a thread samples the process's resident memory; each step's peak is the highest
sample between its start and end (meta.json's timestamps), so it includes what earlier steps
left allocated, as a user would see it.

Peers, each in its own process on the same files:
- ingest: `polars.read_ndjson` and DuckDB `read_json` of the corpus file;
- dedup: a plain Python pass with rensa (bench/dedup.py's peer), with precision and recall on the
  planted near-duplicates for both sides;
- ZIP-FIT: the paper's per-pair gzip method on a sample of candidates, its time extrapolated
  per pair;
- DSIR: the `data-selection` package (its authors' code) on the same candidates and targets.

The peers (datasketch, rensa) come with `pip install -e '.[bench]'`.

Run:  .venv/bin/python bench/scale.py                       (10k, 100k, 1M; ~40 min on 2 cores)
      .venv/bin/python bench/scale.py --rows 10000          (one size)
      .venv/bin/python bench/scale.py --rows 10000000 --steps source,sql,dedup   (the 10M run)
Writes bench/scale.json, bench/scale.md and bench/scale.png (cost against rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path[:0] = [str(ROOT), str(BENCH)]

from corpus import write_corpus, write_targets  # noqa: E402  (bench/corpus.py)
from machine import cpu_name  # noqa: E402  (bench/machine.py)

STEPS = ("source", "sql", "dedup", "select")
SPEC = """\
name: scale
sources:
  corpus: {{path: {corpus}}}
  targets: {{path: {targets}, schema: raw}}
steps:
  filtered:
    sql: |
      SELECT * FROM corpus
      WHERE length(messages[len(messages)].content) >= 20
  deduped:
    dedup: {{input: filtered, exact: true, minhash: {{threshold: {threshold}}}}}
  picked:
    select:
      input: deduped
      target: targets
      target_column: text
      method: zipfit
      budget: {budget}
      params: {{mode: {mode}}}
tracking: {{enabled: false}}
"""
STEP_NAMES = {"source": "corpus", "sql": "filtered", "dedup": "deduped", "select": "picked"}
THRESHOLD = 0.8  # MinHash Jaccard threshold of the dedup step and its peer
ZIPFIT_PEER_SAMPLE = 500  # candidates the paper's method scores (x 200 targets); its time is extrapolated
DSIR_SAMPLE = 200_000


# --------------------------------------------------------------------------- memory


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its high-water mark (VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Sampler(threading.Thread):
    """(wall time, RSS MB) every `every` seconds until stopped."""

    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        self.every, self.samples, self._done = every, [], threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append((time.time(), rss_mb()))
            self._done.wait(self.every)

    def stop(self) -> list[tuple[float, float]]:
        self._done.set()
        self.join()
        return self.samples


def in_subprocess(*args: str) -> dict:
    """Run `bench/scale.py --worker ...` in a fresh process; its JSON answer."""
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    try:
        subprocess.run([sys.executable, __file__, "--worker", *args, str(out)], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


# --------------------------------------------------------------------------- workers (one process each)


def worker_pipeline(spec: str) -> dict:
    """Run the spec once; per step: seconds, rows in/out, peak RSS during it."""
    from datamill.api import run

    sampler = Sampler()
    sampler.start()
    result = run(Path(spec))
    samples = sampler.stop()
    point = result.points[-1]
    out = {"peak_rss_mb": rss_mb("VmHWM"), "steps": {}}
    for name, record in point.steps.items():
        meta = point.plan.workspace.meta(record.key)
        start = datetime.fromisoformat(meta["started_at"]).timestamp()
        end = datetime.fromisoformat(meta["finished_at"]).timestamp()
        during = [rss for t, rss in samples if start - 0.2 <= t <= end + 0.2]
        out["steps"][name] = {"kind": record.kind, "seconds": record.seconds, "rows": meta["stats"].get("rows", {}),
                              "stats": {k: v for k, v in meta["stats"].items() if isinstance(v, (int, float))},
                              "peak_rss_mb": round(max(during), 1) if during else None}
    if "deduped" in point.steps:  # precision and recall on the planted near-duplicates the step saw
        import polars as pl

        planted = pl.read_parquet(point.plan.table_path("filtered"), columns=["planted_dup_of"])
        removed = pl.read_parquet(point.plan.table_path("deduped__removed"), columns=["planted_dup_of"])
        hits = int(removed["planted_dup_of"].is_not_null().sum())
        out["steps"]["deduped"]["quality"] = {
            "removed": removed.height, "precision_planted": round(hits / max(removed.height, 1), 4),
            "recall_planted": round(hits / max(int(planted["planted_dup_of"].is_not_null().sum()), 1), 4)}
    return out


def worker_polars(corpus: str) -> dict:
    import polars as pl

    start = time.monotonic()
    frame = pl.read_ndjson(corpus)
    return {"seconds": time.monotonic() - start, "rows": frame.height, "peak_rss_mb": rss_mb("VmHWM")}


def worker_duckdb(corpus: str) -> dict:
    import duckdb

    start = time.monotonic()
    con = duckdb.connect()
    con.execute(f"CREATE TABLE t AS SELECT * FROM read_json('{corpus}', format='newline_delimited')")
    rows = con.execute("SELECT count(*) FROM t").fetchone()[0]
    return {"seconds": time.monotonic() - start, "rows": rows, "peak_rss_mb": rss_mb("VmHWM")}


def _corpus_texts(corpus: str, limit: int | None = None) -> tuple[list[str], list[bool]]:
    """Texts as the steps compare them (prompt + newline + response) and whether each is planted."""
    texts, planted = [], []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.append(f"{row['prompt']}\n{row['response']}")
            planted.append(row["planted_dup_of"] is not None)
            if limit and len(texts) == limit:
                break
    return texts, planted


def worker_dedup_peer(corpus: str) -> dict:
    """bench/dedup.py's plain Python + rensa pass (JSON parse, shingles, MinHash LSH, keep-first)."""
    from dedup import peer_run

    start = time.monotonic()
    removed = peer_run(Path(corpus), THRESHOLD)
    seconds = time.monotonic() - start
    _, planted = _corpus_texts(corpus)
    hits = sum(planted[i] for i, _ in removed)
    return {"seconds": seconds, "removed": len(removed), "peak_rss_mb": rss_mb("VmHWM"),
            "precision_planted": round(hits / max(len(removed), 1), 4),
            "recall_planted": round(hits / max(sum(planted), 1), 4)}


def worker_zipfit_peer(corpus: str, targets: str, candidates: str) -> dict:
    """The paper's per-pair gzip method on a sample of candidates, extrapolated per candidate to
    the `candidates` the step scored."""
    from zipfit import naive_pool

    sample, _ = _corpus_texts(corpus, ZIPFIT_PEER_SAMPLE)
    target_texts = [json.loads(line)["text"] for line in open(targets, encoding="utf-8")]
    start = time.monotonic()
    naive_pool(sample, target_texts, level=9, workers=os.cpu_count())
    per_candidate = (time.monotonic() - start) / len(sample)
    return {"seconds": per_candidate * int(candidates), "sampled": len(sample), "extrapolated": True,
            "peak_rss_mb": rss_mb("VmHWM")}


def worker_dsir(corpus: str, targets: str, candidates: str) -> dict:
    """DSIR (the `data-selection` package, through datamill's thin wrapper) scoring the corpus's
    texts against the targets; on at most DSIR_SAMPLE rows, extrapolated per row beyond."""
    from selection.dsir import dsir_scores

    texts, _ = _corpus_texts(corpus, DSIR_SAMPLE)
    target_texts = [json.loads(line)["text"] for line in open(targets, encoding="utf-8")]
    start = time.monotonic()
    dsir_scores(texts, target_texts, Path(tempfile.mkdtemp(prefix="dsir-")))
    seconds = time.monotonic() - start
    return {"seconds": seconds * int(candidates) / len(texts), "sampled": len(texts),
            "extrapolated": len(texts) < int(candidates), "peak_rss_mb": rss_mb("VmHWM")}


WORKERS = {"pipeline": worker_pipeline, "polars": worker_polars, "duckdb": worker_duckdb,
           "dedup_peer": worker_dedup_peer, "zipfit_peer": worker_zipfit_peer, "dsir": worker_dsir}


# --------------------------------------------------------------------------- one size


def prepare(rows: int, folder: Path) -> tuple[Path, Path]:
    """The corpus and targets files for `rows` (made once, kept in `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / f"corpus-{rows}.jsonl"
    if not corpus.exists():
        started = time.monotonic()
        write_corpus(corpus, rows, seed=0)
        print(f"  corpus of {rows:,} rows written in {time.monotonic() - started:.0f} s ({corpus})")
    targets = folder / "targets.jsonl"
    if not targets.exists():
        write_targets(targets)
    return corpus, targets


def measure(rows: int, folder: Path, steps: tuple[str, ...], mode: str, peers: bool = True) -> dict:
    corpus, targets = prepare(rows, folder)
    spec_dir = Path(tempfile.mkdtemp(prefix=f"scale-{rows}-", dir=folder))
    text = SPEC.format(corpus=corpus, targets=targets, budget=max(100, rows // 100), mode=mode,
                       threshold=THRESHOLD)
    if "select" not in steps:
        text = text[:text.index("  picked:")] + "tracking: {enabled: false}\n"
    if "dedup" not in steps:
        text = text[:text.index("  deduped:")] + "tracking: {enabled: false}\n"
    (spec_dir / "spec.yaml").write_text(text)
    print(f"  pipeline ({', '.join(steps)}) on {rows:,} rows ...")
    out = {"rows": rows, "file_mb": round(corpus.stat().st_size / 2**20, 1), "zipfit_mode": mode,
           "pipeline": in_subprocess("pipeline", str(spec_dir / "spec.yaml"))}
    if not peers:
        out["peers"] = {}
        return out
    print(f"  peers on {rows:,} rows ...")
    peers = out["peers"] = {"polars.read_ndjson": {"step": "source", **in_subprocess("polars", str(corpus))},
                            "duckdb.read_json": {"step": "source", **in_subprocess("duckdb", str(corpus))}}
    steps_run = out["pipeline"]["steps"]
    if "deduped" in steps_run:
        peers["python + rensa"] = {"step": "dedup", **in_subprocess("dedup_peer", str(corpus))}
    if "picked" in steps_run:
        candidates = str(steps_run["picked"]["stats"]["candidates"])
        peers["paper's ZIP-FIT"] = {"step": "select", **in_subprocess("zipfit_peer", str(corpus), str(targets),
                                                                      candidates)}
        peers["DSIR (data-selection)"] = {"step": "select", **in_subprocess("dsir", str(corpus), str(targets),
                                                                            candidates)}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--zipfit-mode", default="exact", choices=["exact", "fast"])
    parser.add_argument("--data", default=os.environ.get("DATAMILL_SCALE_DATA", str(Path(tempfile.gettempdir()) / "datamill-scale")),
                        help="where the corpora are kept between runs")
    parser.add_argument("--no-peers", action="store_true",
                        help="datamill alone (the 10M run: the peers' whole-table reads need more memory than "
                             "the machine has to spare)")
    parser.add_argument("--out", default="scale", help="results go to bench/OUT.json, .md and .png")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, *params, out = args.worker
        Path(out).write_text(json.dumps(WORKERS[kind](*params)))
        return
    steps = tuple(s for s in STEPS if s in args.steps.split(","))
    results = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
               "date": datetime.now().strftime("%Y-%m-%d"), "sizes": []}
    for rows in args.rows:
        results["sizes"].append(measure(rows, Path(args.data), steps, args.zipfit_mode, not args.no_peers))
        (BENCH / f"{args.out}.json").write_text(json.dumps(results, indent=2))  # after each size: a long run keeps its parts
    (BENCH / f"{args.out}.md").write_text(markdown(results))
    plot(results, BENCH / f"{args.out}.png")
    print(markdown(results))


# --------------------------------------------------------------------------- report


def _rows_in(size: dict, name: str) -> int:
    """The rows a step read: the source's rows in, else its input step's main table."""
    steps = size["pipeline"]["steps"]
    stats = steps[name]["stats"]
    if "rows_in" in stats:
        return stats["rows_in"]
    order = [n for n in STEP_NAMES.values() if n in steps]
    before = order[order.index(name) - 1]
    return steps[before]["rows"].get("main", 0)


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# The data path at scale ({m['cpu']}, {m['cores']} cores)", "",
             "The scale corpus (bench/corpus.py: instruction rows with a median of ~530 characters and a tail "
             "to 8,000; 10 % planted near-duplicates; a 2 % target family) through `source -> sql -> dedup "
             "(exact + MinHash 0.8) -> select (ZIP-FIT, 200 targets, budget 1 %)`, one `datamill run` process per "
             "size, fresh workspace, no tracking. Peak RSS: the highest resident memory sampled while the step "
             f"ran (what earlier steps left allocated included). Python {m['python']}, {results['date']}.", "",
             "| rows | file | step | seconds | rows/s | peak RSS | peer on the same data | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for size in results["sizes"]:
        steps = size["pipeline"]["steps"]
        for kind, name in STEP_NAMES.items():
            if name not in steps:
                continue
            step = steps[name]
            rows_in = _rows_in(size, name)
            peer, ratio = "", ""
            for label, figures in size.get("peers", {}).items():
                if figures.get("step") == kind:
                    peer += f"{label}: {figures['seconds']:.2f} s<br>"
                    ratio += f"{step['seconds'] / max(figures['seconds'], 1e-9):.1f}x<br>"
            lines.append(f"| {size['rows']:,} | {size['file_mb']} MB | {kind} ({name}) | {step['seconds']:.1f} | "
                         f"{rows_in / max(step['seconds'], 1e-9):,.0f} | {step['peak_rss_mb']:,.0f} MB | "
                         f"{peer.removesuffix('<br>')} | {ratio.removesuffix('<br>')} |")
        lines.append(f"| {size['rows']:,} | | **whole run** | "
                     f"{sum(s['seconds'] for s in steps.values()):.1f} | | "
                     f"{size['pipeline']['peak_rss_mb']:,.0f} MB | | |")
    lines += ["", "Ratio: datamill's seconds over the peer's (above 1: datamill is slower). Peers read or compute "
              "only; the step also writes its tables.", "", "Command: `.venv/bin/python bench/scale.py`", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, name in STEP_NAMES.items():
        points = [(s["rows"], s["pipeline"]["steps"][name]) for s in sizes if name in s["pipeline"]["steps"]]
        if points:
            left.plot([r for r, _ in points], [st["seconds"] for _, st in points], marker="o", label=kind)
            right.plot([r for r, _ in points], [st["peak_rss_mb"] for _, st in points], marker="o", label=kind)
    for axis, label in ((left, "seconds"), (right, "peak RSS (MB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("rows")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    fig.suptitle("datamill's data path: cost against rows (2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
