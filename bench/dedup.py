"""Dedup speed and quality: the `dedup` step next to today's datasketch path and a plain-Python + rensa
pass, on the scale corpus (bench/corpus.py) with its planted near-duplicates.

Sides, each in a fresh process (so that its peak RSS is its own), interleaved, best of `--repeat`:
- datamill: the `dedup` step (exact + MinHash at the threshold) run as `datamill run` runs it on
  the local executor: a StepContext over the corpus as a Parquet table of messages, reading it in
  streamed batches and writing `main` and `removed`;
- before: the step as it was (a copy below): the whole table read, datasketch MinHash sketches,
  a sequential query-before-insert MinHashLSH, keep-first; the same table in and out;
- peer: the plain Python + rensa pass the step should be near: read the JSONL, join prompt and
  response, normalise, shingle, one `rensa.RMinHash` per row and `RMinHashLSH` keep-first (query
  before insert, a candidate counts when its estimate reaches the threshold), writing nothing.

Quality on the planted near-duplicates: a planted row counts for recall when the true Jaccard of
its 3-gram set with its original's reaches the threshold; a removed row is a true positive when it
is planted or its true Jaccard with its `duplicate_of` row reaches the threshold.

The peers (datasketch, rensa) come with `pip install -e '.[bench]'`.

Run:  .venv/bin/python bench/dedup.py                   (100k and 1M rows; ~50 min on 2 cores)
      .venv/bin/python bench/dedup.py --rows 100000     (one size)
      .venv/bin/python bench/dedup.py --quick           (20k rows, one repeat; prints only)
Writes bench/dedup.json and bench/dedup.md. `before` runs once above 100k rows (it takes minutes), and
not at all above --before-max-rows: then its time is extrapolated linearly from the largest size it
ran (said in the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SIDES = ("datamill", "before", "peer")
BEFORE_REPEATED_UP_TO = 100_000  # above, `before` runs once (it takes minutes)
SPREAD_PAIRS = 2000  # planted pairs the estimates' error is measured on


# --------------------------------------------------------------------------- data

def prepare(rows: int, work: Path) -> tuple[Path, Path]:
    """The corpus as JSONL (bench/corpus.py) and as the Parquet table a `source` step would make
    of it (id, messages, source, plus the corpus's fields and its row number); reused if present."""
    import polars as pl
    from corpus import write_corpus

    jsonl, table = work / f"corpus-{rows}.jsonl", work / f"table-{rows}.parquet"
    if not jsonl.exists():
        print(f"{rows:,} rows: writing the corpus ...", flush=True)
        write_corpus(jsonl, rows)
    if not table.exists():
        frame = pl.read_ndjson(jsonl, schema={"prompt": pl.String, "response": pl.String, "family": pl.String,
                                              "planted_dup_of": pl.Int64})
        frame.with_row_index("row").select(
            # a content hash as id, as a source gives (its exact value does not matter here)
            (pl.col("prompt") + "\n" + pl.col("response")).hash(0).map_elements(
                lambda h: f"{h:016x}", return_dtype=pl.String).alias("id"),
            pl.concat_list(pl.struct(role=pl.lit("user"), content="prompt"),
                           pl.struct(role=pl.lit("assistant"), content="response")).alias("messages"),
            pl.lit("corpus").alias("source"), pl.col("row").cast(pl.Int64), "family", "planted_dup_of",
        ).write_parquet(table)
    return jsonl, table


# --------------------------------------------------------------------------- before: the step as it was

def before_run(table_path: Path, out: Path, threshold: float, num_perm: int = 128, ngram: int = 3, seed: int = 1):
    """DedupStep.run of version 1 (datasketch), reading and writing the same tables."""
    import polars as pl

    from datamill.records import column_texts
    from datamill.steps.dedup import normalize_text

    table = pl.read_parquet(table_path)
    texts = [normalize_text(t) for t in column_texts(table, "messages")]
    n = table.height
    target: list[int | None] = [None] * n
    method: list[str | None] = [None] * n
    similarity: list[float | None] = [None] * n
    _old_find_exact(texts, target, method, similarity)
    _old_find_near(texts, threshold, num_perm, ngram, seed, target, method, similarity)
    for i in range(n):
        j = target[i]
        if method[i] == "exact" and target[j] is not None:
            target[i], method[i], similarity[i] = target[j], method[j], similarity[j]
    removed = pl.Series([t is not None for t in target], dtype=pl.Boolean)
    labels = table["id"].cast(pl.String).to_list()
    removed_rows = table.filter(removed).with_columns(
        pl.Series("duplicate_of", [labels[t] for t in target if t is not None], dtype=pl.String),
        pl.Series("method", [m for m in method if m is not None], dtype=pl.String),
        pl.Series("similarity", [s for s in similarity if s is not None], dtype=pl.Float64),
    )
    out.mkdir(parents=True, exist_ok=True)
    table.filter(~removed).write_parquet(out / "main.parquet")
    removed_rows.write_parquet(out / "removed.parquet")
    return [(i, t) for i, t in enumerate(target) if t is not None]


def _old_shingles(text: str, ngram: int) -> list[bytes]:
    words = text.split(" ")
    if len(words) < ngram:
        return [text.encode("utf-8")]
    return [" ".join(words[i:i + ngram]).encode("utf-8") for i in range(len(words) - ngram + 1)]


def _old_find_exact(texts, target, method, similarity) -> None:
    import hashlib

    first_with: dict[bytes, int] = {}
    for i, text in enumerate(texts):
        key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        first = first_with.setdefault(key, i)
        if first != i:
            target[i], method[i], similarity[i] = first, "exact", 1.0


def _old_find_near(texts, threshold, num_perm, ngram, seed, target, method, similarity) -> None:
    from datasketch import MinHash, MinHashLSH

    rows = [i for i in range(len(texts)) if target[i] is None]
    sketches = MinHash.generator((_old_shingles(texts[i], ngram) for i in rows), num_perm=num_perm, seed=seed)
    index = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept: dict[int, MinHash] = {}
    for i, sketch in zip(rows, sketches):
        best, best_similarity = None, -1.0
        for candidate in index.query(sketch):
            estimate = sketch.jaccard(kept[candidate])
            if estimate >= threshold and (estimate > best_similarity or
                                          (estimate == best_similarity and candidate < best)):
                best, best_similarity = candidate, estimate
        if best is None:
            index.insert(i, sketch)
            kept[i] = sketch
        else:
            target[i], method[i], similarity[i] = best, "minhash", float(best_similarity)


# --------------------------------------------------------------------------- the peer

def peer_run(jsonl: Path, threshold: float, num_perm: int = 128, ngram: int = 3, seed: int = 1):
    """Plain Python + rensa: JSONL -> joined, normalised, shingled text -> RMinHash -> RMinHashLSH
    keep-first. -> [(removed row, the kept row it duplicates)]."""
    from rensa import RMinHash, RMinHashLSH

    from datamill.steps.dedup import normalize_text

    index = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=rensa_bands(threshold, num_perm))
    kept: dict[int, RMinHash] = {}
    removed = []
    with open(jsonl, encoding="utf-8") as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            words = normalize_text(row["prompt"] + "\n" + row["response"]).split(" ")
            shingles = ([" ".join(words[k:k + ngram]) for k in range(len(words) - ngram + 1)]
                        if len(words) >= ngram else [" ".join(words)])
            sketch = RMinHash(num_perm=num_perm, seed=seed)
            sketch.update(shingles)
            best, best_similarity = None, -1.0
            for candidate in index.query(sketch):
                estimate = sketch.jaccard(kept[candidate])
                if estimate >= threshold and (estimate > best_similarity or
                                              (estimate == best_similarity and candidate < best)):
                    best, best_similarity = candidate, estimate
            if best is None:
                index.insert(i, sketch)
                kept[i] = sketch
            else:
                removed.append((i, best))
    return removed


def rensa_bands(threshold: float, num_perm: int) -> int:
    """Bands for rensa's index, which splits all num_perm values evenly: the fewest with which a pair
    at the threshold is a candidate 99 % of the time, as the step's bands (`lsh_bands`) are chosen
    (the same 16 x 8 at 0.85; at 0.8, 32 x 4 where the step has 21 x 6)."""
    for bands in (b for b in range(1, num_perm + 1) if num_perm % b == 0):
        if 1 - (1 - threshold ** (num_perm // bands)) ** bands >= 0.99:
            return bands
    return num_perm


# --------------------------------------------------------------------------- datamill

def datamill_run(table_path: Path, out: Path, threshold: float):
    """The dedup step as `datamill run` runs it (local executor). -> (removed pairs, stats)."""
    import polars as pl

    from datamill import progress
    from datamill.step import Env, StepContext
    from datamill.steps.dedup import DedupStep

    progress.set_quiet(True)
    phases = {}
    for name in ("_hash", "_write"):  # time the two passes over the table; the rest is resolving
        def timed(*args, _f=getattr(DedupStep, name), _name=name, **kw):
            start = time.perf_counter()
            try:
                return _f(*args, **kw)
            finally:
                phases[_name.strip("_")] = round(time.perf_counter() - start, 2)
        setattr(DedupStep, name, timed)
    step = DedupStep("dedup", DedupStep.Config(input="pool", minhash={"threshold": threshold}))
    ctx = StepContext(name="dedup", kind="dedup", key="bench", out_dir=out, state_dir=out / "state",
                      shared_dir=out / "shared", env=Env(base_dir=ROOT), input_paths={"pool": table_path},
                      model_paths={})
    start = time.perf_counter()
    step.run(ctx)
    seconds = time.perf_counter() - start
    phases["resolve"] = round(seconds - phases["hash"] - phases["write"], 2)
    removed = pl.read_parquet(out / "tables" / "removed.parquet", columns=["row", "duplicate_of"])
    ids = pl.read_parquet(table_path, columns=["id", "row"]).unique("id", keep="first", maintain_order=True)
    pairs = removed.join(ids.rename({"id": "duplicate_of", "row": "dup_row"}), on="duplicate_of", how="left")
    return list(zip(pairs["row"].to_list(), pairs["dup_row"].to_list())), seconds, {**ctx.stats, "phases": phases}


def child(side: str, rows: int, work: Path, threshold: float) -> None:
    """One side, in this (fresh) process: prints {seconds, rss_mb, ...} and saves its removed pairs."""
    jsonl, table = work / f"corpus-{rows}.jsonl", work / f"table-{rows}.parquet"
    out = Path(tempfile.mkdtemp(dir=work))
    stats = {}
    start = time.perf_counter()
    if side == "datamill":
        pairs, seconds, stats = datamill_run(table, out, threshold)
    elif side == "before":
        pairs = before_run(table, out, threshold)
        seconds = time.perf_counter() - start
    else:
        pairs = peer_run(jsonl, threshold)
        seconds = time.perf_counter() - start
    (work / f"pairs-{side}-{rows}.json").write_text(json.dumps(pairs))
    shutil.rmtree(out)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rss_mb": rss_mb, "removed": len(pairs),
                      "stats": {k: v for k, v in stats.items() if k in ("minhash", "shards", "phases")}}))


def run_child(side: str, rows: int, work: Path, threshold: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", side, "--rows", str(rows), "--work", str(work),
                           "--threshold", str(threshold)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if proc.returncode:
        raise RuntimeError(f"{side} at {rows} rows failed (exit status {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- quality

def quality(rows: int, work: Path, threshold: float, sides: list[str], ngram: int = 3) -> dict:
    """Precision and recall of each side's removed rows on the planted near-duplicates."""
    from datamill.steps.dedup import normalize_text, shingles

    pairs = {side: json.loads((work / f"pairs-{side}-{rows}.json").read_text()) for side in sides}
    planted: dict[int, int] = {}
    with open(work / f"corpus-{rows}.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            original = json.loads(line)["planted_dup_of"]
            if original is not None:
                planted[i] = original
    needed = {r for i, j in planted.items() for r in (i, j)}
    needed |= {r for side in sides for pair in pairs[side] for r in pair}
    sample = list(planted.items())[:SPREAD_PAIRS]
    texts, sets = {}, {}
    with open(work / f"corpus-{rows}.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i in needed:
                row = json.loads(line)
                text = normalize_text(row["prompt"] + "\n" + row["response"])
                sets[i] = set(shingles(text, ngram))
                texts[i] = text

    def jaccard(i: int, j: int) -> float:
        a, b = sets[i], sets[j]
        return len(a & b) / len(a | b)

    findable = {i for i, j in planted.items() if jaccard(i, j) >= threshold}
    result = {"planted": len(planted), "planted_at_threshold": len(findable),
              "estimate_error": estimate_error([(texts[i], texts[j], jaccard(i, j)) for i, j in sample], ngram)}
    for side in sides:
        removed = {i: j for i, j in pairs[side]}
        true = sum(1 for i, j in removed.items() if i in planted or jaccard(i, j) >= threshold)
        result[side] = {"removed": len(removed), "true_positives": true,
                        "precision": round(true / len(removed), 4) if removed else None,
                        "recall": round(len(findable & removed.keys()) / len(findable), 4) if findable else None}
    return result


def estimate_error(pairs: list[tuple[str, str, float]], ngram: int, num_perm: int = 128, seed: int = 1) -> dict:
    """How far each side's MinHash estimate of a pair's Jaccard falls from the true one (mean and
    standard deviation of the difference), on planted pairs: the spread decides how many pairs
    just above the threshold an estimate misses. `independent`: what independent permutations give."""
    import numpy as np
    from datasketch import MinHash
    from rensa import RMinHash

    from datamill.steps.dedup import shingles, signatures

    true = np.array([j for _, _, j in pairs])
    sigs = signatures([t for a, b, _ in pairs for t in (a, b)], ngram, num_perm, seed)
    estimates = {"datamill": (sigs[0::2] == sigs[1::2]).mean(axis=1)}

    def rensa(text):
        sketch = RMinHash(num_perm=num_perm, seed=seed)
        sketch.update([s.decode() for s in shingles(text, ngram)])
        return sketch

    def datasketch(text):
        sketch = MinHash(num_perm=num_perm, seed=seed)
        sketch.update_batch(shingles(text, ngram))
        return sketch

    estimates["peer"] = np.array([rensa(a).jaccard(rensa(b)) for a, b, _ in pairs])
    estimates["before"] = np.array([datasketch(a).jaccard(datasketch(b)) for a, b, _ in pairs])
    out = {side: {"mean": round(float((e - true).mean()), 4), "std": round(float((e - true).std()), 4)}
           for side, e in estimates.items()}
    independent = float(np.sqrt(true * (1 - true) / num_perm).mean())
    return {"pairs": len(pairs), **out, "independent_std": round(independent, 4)}


# --------------------------------------------------------------------------- main

def measure(rows: int, work: Path, threshold: float, repeat: int, sides: list[str]) -> dict:
    prepare(rows, work)
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(repeat):
        for side in sides:
            if side == "before" and rows > BEFORE_REPEATED_UP_TO and r:
                continue  # minutes a run: once
            result = run_child(side, rows, work, threshold)
            runs[side].append(result)
            print(f"  {rows:,} rows, {side} #{r + 1}: {result['seconds']:.1f} s, {result['rss_mb']:.0f} MB peak RSS, "
                  f"{result['removed']:,} removed", flush=True)
    out = {"rows": rows, "quality": quality(rows, work, threshold, sides)}
    for side, results in runs.items():
        best = min(r["seconds"] for r in results)
        fastest = min(results, key=lambda r: r["seconds"])
        out[side] = {"seconds": round(best, 2), "seconds_all": [round(r["seconds"], 2) for r in results],
                     "rows_per_s": round(rows / best), "peak_rss_mb": round(max(r["rss_mb"] for r in results)),
                     **({"stats": fastest["stats"]} if fastest["stats"] else {})}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--threshold", type=float, default=0.85)
    parser.add_argument("--repeat", type=int, default=3, help="runs per side and size (best time kept)")
    parser.add_argument("--before-max-rows", type=int, default=1_000_000,
                        help="the largest size `before` runs at (above: its time extrapolated)")
    parser.add_argument("--work", type=Path, help="folder for the corpora and tables (kept; default: a temp one)")
    parser.add_argument("--quick", action="store_true", help="20,000 rows, one repeat; print, write nothing")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.rows[0], args.work, args.threshold)
        return
    if args.quick:
        args.rows, args.repeat = [20_000], 1
    from machine import cpu_name

    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for rows in args.rows:
            sides = [s for s in SIDES if s != "before" or rows <= args.before_max_rows]
            results.append(measure(rows, work, args.threshold, args.repeat, sides))
    measured = [r for r in results if "before" in r]
    for r in results:
        if "before" not in r and measured:  # linear in rows: one pass, an LSH query and insert per row
            base = measured[-1]
            r["before"] = {"seconds": round(base["before"]["seconds"] * r["rows"] / base["rows"], 1),
                           "extrapolated_from": base["rows"]}
        for peer in ("before", "peer"):
            if peer in r:
                r[f"{peer}_over_datamill"] = round(r[peer]["seconds"] / r["datamill"]["seconds"], 2)
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2)},
        "date": time.strftime("%Y-%m-%d"), "threshold": args.threshold, "num_perm": 128, "ngram": 3,
        "repeat": args.repeat, "runs": results,
        "command": ".venv/bin/python bench/dedup.py" + ("" if args.rows == [100_000, 1_000_000]
                                                        else " --rows " + " ".join(map(str, args.rows))),
    }
    print(markdown(result))
    if not args.quick:
        (ROOT / "bench" / "dedup.json").write_text(json.dumps(result, indent=2) + "\n")
        (ROOT / "bench" / "dedup.md").write_text(markdown(result))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Dedup: datamill vs today's datasketch path and a plain-Python + rensa pass ({m['cpu']}, "
             f"{m['cores']} cores)", "",
             f"Exact + MinHash dedup at threshold {r['threshold']} ({r['num_perm']} permutations, {r['ngram']}-word "
             f"shingles) of the scale corpus (bench/corpus.py: ~520-character instruction rows, 10 % planted "
             f"near-duplicates). Python {m['python']}, {r['date']}; load average {m['load_avg_1m_before']} before, "
             f"{m['load_avg_1m_after']} after (the machine was shared). Each side in its own process, "
             f"interleaved, best of {r['repeat']} (`before` once above {BEFORE_REPEATED_UP_TO:,} rows); peak RSS "
             "is the process's (imports included).", "",
             "| rows | side | seconds | rows/s | peak RSS | removed | precision | recall | its time / datamill's |",
             "|---|---|---|---|---|---|---|---|---|"]
    names = {"datamill": "**datamill** (the step)", "before": "before (datasketch)", "peer": "plain Python + rensa"}
    for run in r["runs"]:
        q = run["quality"]
        for side in SIDES:
            s = run.get(side)
            if s is None:
                continue
            qs = q.get(side, {})
            if "extrapolated_from" in s:
                seconds, rate, rss = f"{s['seconds']} (extrapolated from {s['extrapolated_from']:,} rows)", "", ""
            else:
                seconds, rate, rss = f"{s['seconds']}", f"{s['rows_per_s']:,}", f"{s['peak_rss_mb']:,} MB"
            ratio = "1" if side == "datamill" else f"{run[side + '_over_datamill']}x"
            lines.append(f"| {run['rows']:,} | {names[side]} | {seconds} | {rate} | {rss} | {qs.get('removed', '')} | "
                         f"{qs.get('precision', '')} | {qs.get('recall', '')} | {ratio} |")
    lines += ["", "Quality: a planted row counts for recall when the true 3-gram Jaccard with its original reaches "
              "the threshold; a removed row is a true positive when it is planted or its true Jaccard with its "
              "`duplicate_of` row reaches the threshold. " +
              "; ".join(f"{run['rows']:,} rows: {run['quality']['planted']:,} planted, "
                        f"{run['quality']['planted_at_threshold']:,} at the threshold" for run in r["runs"]) + ".",
              "", "LSH bands: the step's (`lsh_bands`) are the longest with which a pair at the threshold is a "
              "candidate 99 % of the time, 16 bands of 8 at 0.85; the peer's are chosen so too (the same 16 x 8); "
              "before has datasketch's (8 of 16: a pair at 0.85 is a candidate 46 % of the time). Every candidate is "
              "confirmed by its MinHash estimate on every side, so what recall is left is the estimate's spread: "
              "estimate minus true Jaccard on the first planted pairs, " + "; ".join(
                  f"{run['rows']:,} rows ({e['pairs']:,} pairs): datamill {e['datamill']['mean']:+} ± "
                  f"{e['datamill']['std']}, before (datasketch) {e['before']['mean']:+} ± {e['before']['std']}, "
                  f"peer (rensa) {e['peer']['mean']:+} ± {e['peer']['std']}, independent permutations ± "
                  f"{e['independent_std']}" for run in r["runs"] for e in [run["quality"]["estimate_error"]]) +
              ". rensa's signatures spread less than independent permutations do; the step's as much.",
              "", "The step's time covers reading the Parquet table twice (hashing, then writing), exact and "
              "MinHash dedup and writing `main` and `removed` through `ctx.writer` (parts, then one file); the peer "
              "reads JSONL and writes nothing. The step's phases in its best run: " +
              "; ".join(f"{run['rows']:,} rows: " + ", ".join(f"{k} {v} s" for k, v in run["datamill"]["stats"]
                                                               ["phases"].items()) +
                        f" ({run['datamill']['stats']['minhash']['candidate_rows']:,} rows had a bucket to look in, "
                        f"{run['datamill']['stats']['shards']} shards)" for run in r["runs"]) + ".",
              "", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
