"""Ingest speed: the `source` step reading a file of instruction rows, next to Polars and DuckDB
reading the same file, in the same run.

The file is the scale corpus (bench/corpus.py: {prompt, response, family, planted_dup_of}, median
~530 characters a row) as JSON Lines, and the same rows as CSV, Parquet and a `save_to_disk`
folder (hf_disk). The step runs as `datamill run` runs it (a StepContext, `step.run(ctx)`): it
reads, normalises every row to the instruction schema (id = sha256 of the messages) and writes
its two Parquet tables. The peers only read the file into a table: `polars.read_ndjson` /
`read_csv` / `read_parquet` / `read_ipc_stream` (the hf_disk folder's Arrow file), DuckDB's
`read_json` / `read_csv` / `read_parquet`. "before" is the step reading a row at a time (the row
path, `source._ROW_PATH`), as it did before it read by columns.

Every measurement runs in its own process (peak RSS = its VmHWM, imports included); the peers are
interleaved, best of `--repeat` runs each; the row path runs once (it is slow), for JSON Lines up
to 1M rows, for the other formats up to 100k rows.

Run:  .venv/bin/python bench/ingest.py                  (100k and 1M rows; ~25 min on 2 cores)
      .venv/bin/python bench/ingest.py --rows 100000    (one size)
      .venv/bin/python bench/ingest.py --quick          (20k rows, JSON Lines; prints only)
Writes bench/ingest.json and bench/ingest.md. The corpus files are kept in the temp folder
(datamill-bench-ingest/) for the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_name  # noqa: E402  (bench/machine.py)

FORMATS = ("jsonl", "csv", "parquet", "hf_disk")
PEERS = ("polars", "duckdb", "datamill")
BEFORE_MAX_ROWS = {"jsonl": 1_000_000, "csv": 100_000, "parquet": 100_000, "hf_disk": 100_000}
CACHE = Path(tempfile.gettempdir()) / "datamill-bench-ingest"


# --------------------------------------------------------------------------- data

def corpus_files(rows: int, formats) -> dict[str, Path]:
    """The corpus of `rows` rows in each format, made once and kept in CACHE."""
    import polars as pl

    from corpus import write_corpus

    CACHE.mkdir(parents=True, exist_ok=True)
    jsonl = CACHE / f"corpus-{rows}-s0.jsonl"
    if not jsonl.exists():
        print(f"writing the {rows:,}-row corpus ...", flush=True)
        write_corpus(jsonl, rows)
    files = {"jsonl": jsonl, "csv": CACHE / f"corpus-{rows}-s0.csv", "parquet": CACHE / f"corpus-{rows}-s0.parquet",
             "hf_disk": CACHE / f"corpus-{rows}-s0.hf"}
    if any(not files[f].exists() for f in formats if f != "jsonl"):
        table = pl.read_ndjson(jsonl)
        if "csv" in formats and not files["csv"].exists():
            table.write_csv(files["csv"])
        if "parquet" in formats and not files["parquet"].exists():
            table.write_parquet(files["parquet"])
        if "hf_disk" in formats and not files["hf_disk"].exists():
            import datasets

            datasets.Dataset(table.to_arrow()).save_to_disk(str(files["hf_disk"]))
    return {f: files[f] for f in formats}


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e6, 1)


# --------------------------------------------------------------------------- one measurement (a child process)

def child(kind: str, fmt: str, path: Path) -> dict:
    """Read `path` as `kind` does; -> {seconds, rows} (peak RSS is added by the caller's wrapper)."""
    if kind in ("datamill", "before"):
        return run_step(fmt, path, row_path=kind == "before")
    if kind == "polars":
        import polars as pl

        read = {"jsonl": pl.read_ndjson, "csv": pl.read_csv, "parquet": pl.read_parquet,
                "hf_disk": lambda p: pl.concat([pl.read_ipc_stream(f) for f in sorted(p.glob("*.arrow"))])}[fmt]
        start = time.perf_counter()
        table = read(path)
        return {"seconds": time.perf_counter() - start, "rows": table.height}
    if kind == "duckdb":
        import duckdb

        function = {"jsonl": "read_json", "csv": "read_csv", "parquet": "read_parquet"}[fmt]
        con = duckdb.connect()
        start = time.perf_counter()
        table = con.sql(f"SELECT * FROM {function}('{path}')").to_arrow_table()
        return {"seconds": time.perf_counter() - start, "rows": table.num_rows}
    raise ValueError(kind)


def run_step(fmt: str, path: Path, row_path: bool) -> dict:
    """The source step as `datamill run` runs it on the local executor: a StepContext, `run(ctx)`."""
    import shutil

    import polars as pl

    import datamill.steps.source as source
    from datamill import progress
    from datamill.step import Env, StepContext

    progress.set_quiet(True)
    source._ROW_PATH = row_path
    writing = _time_table_writer()
    import numpy  # noqa: F401  (imported by any `datamill run` before its first step: not timed)
    import pyarrow.json  # noqa: F401
    step = source.SourceStep("corpus", source.SourceStep.Config(path=str(path), format=fmt))
    env = Env(base_dir=ROOT)
    step.check(env)
    work = Path(tempfile.mkdtemp(prefix="ingest-", dir=CACHE))
    try:
        ctx = StepContext(name="corpus", kind="source", key="bench", out_dir=work / "out", state_dir=work / "state",
                          shared_dir=work / "shared", env=env, input_paths={}, model_paths={})
        start = time.perf_counter()
        step.run(ctx)
        seconds = time.perf_counter() - start
        rows = pl.scan_parquet(work / "out" / "tables" / "main.parquet").select(pl.len()).collect().item()
        return {"seconds": seconds, "rows": rows, "rejected": ctx.stats["rejected"], "writing_s": writing[0]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _time_table_writer() -> list[float]:
    """Seconds the step spends in its TableWriters (Parquet parts, and joining them on close),
    summed into the returned one-item list as it runs."""
    from datamill.step import TableWriter

    spent = [0.0]

    def timed(method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return wrapper

    TableWriter.write, TableWriter.close = timed(TableWriter.write), timed(TableWriter.close)
    return spent


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measure(kind: str, fmt: str, path: Path) -> dict | None:
    """One measurement in a fresh process; None when the peer cannot read the format."""
    if kind == "duckdb" and fmt == "hf_disk":
        return None  # DuckDB has no reader for Arrow stream files without an extension
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", kind, fmt, str(path)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{kind} on {fmt} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- runs

def run_size(rows: int, formats, repeat: int, before: bool) -> list[dict]:
    files = corpus_files(rows, formats)
    out = []
    for fmt in formats:
        path = files[fmt]
        runs: dict[str, list[dict]] = {kind: [] for kind in PEERS}
        for _ in range(repeat):  # interleaved: a change of load hits every peer alike
            for kind in PEERS:
                result = measure(kind, fmt, path)
                if result is not None:
                    runs[kind].append(result)
        entry = {"format": fmt, "rows": rows, "file_mb": size_mb(path)}
        for kind, results in runs.items():
            if results:
                best = min(results, key=lambda r: r["seconds"])
                entry[kind] = {"seconds": round(best["seconds"], 3), "rows_per_s": round(rows / best["seconds"]),
                               "peak_rss_mb": max(r["peak_rss_mb"] for r in results), "rows": best["rows"],
                               "runs": [round(r["seconds"], 3) for r in results]}
                if "writing_s" in best:
                    entry[kind]["writing_s"] = round(best["writing_s"], 3)
        if before and rows <= BEFORE_MAX_ROWS[fmt]:
            result = measure("before", fmt, path)
            entry["before"] = {"seconds": round(result["seconds"], 3), "rows_per_s": round(rows / result["seconds"]),
                               "peak_rss_mb": result["peak_rss_mb"], "rows": result["rows"],
                               "writing_s": round(result["writing_s"], 3)}
        polars_s = entry["polars"]["seconds"]
        for kind in ("duckdb", "datamill", "before"):
            if kind in entry:
                entry[kind]["vs_polars"] = round(entry[kind]["seconds"] / polars_s, 2)
        mill = entry["datamill"]
        mill["vs_polars_without_writing"] = round((mill["seconds"] - mill["writing_s"]) / polars_s, 2)
        out.append(entry)
        print(line_of(entry), flush=True)
    return out


def line_of(e: dict) -> str:
    def cell(kind):
        if kind not in e:
            return "-"
        r = e[kind]
        ratio = f" ({r['vs_polars']}x)" if "vs_polars" in r else ""
        return f"{r['seconds']:.2f} s{ratio}, {r['peak_rss_mb']:.0f} MB"

    mill = e["datamill"]
    writing = f"{mill['writing_s']:.2f} s ({mill['vs_polars_without_writing']}x without)"
    return (f"| {e['format']} | {e['rows']:,} | {e['file_mb']:,} | {cell('polars')} | {cell('duckdb')} | "
            f"{cell('datamill')} | {writing} | {mill['rows_per_s']:,} | {cell('before')} |")


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Ingest: the `source` step vs Polars and DuckDB reading the same file ({m['cpu']}, {m['cores']} cores)",
             "",
             "The scale corpus (bench/corpus.py; {prompt, response, family, planted_dup_of}, median ~530 characters "
             "a row) in each format. datamill = the `source` step as `datamill run` runs it: read, normalise to the "
             "instruction schema (id = sha256 of the messages), write its Parquet tables. The peers only read the "
             "file into a table. before = the same step reading a row at a time (the row path it had before). "
             f"Seconds: best of {r['repeat']} interleaved runs, each in its own process; peak RSS: the process's "
             f"VmHWM, imports included. Python {m['python']}, {r['date']}; load average {m['load_avg_1m_before']} "
             f"before, {m['load_avg_1m_after']} after.",
             "",
             "| format | rows | file MB | polars | duckdb | datamill | of which writing Parquet | datamill rows/s "
             "| before |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [line_of(e) for e in r["runs"]]
    lines += ["", "Cells: seconds (x the polars time), peak RSS. " + r["note"], "", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


NOTE = ("The step's time includes writing its two Parquet tables (zstd), which the peers do not do: \"of which "
        "writing Parquet\" is the time spent in its TableWriters (datamill/step.py), and \"x without\" the ratio to "
        "Polars without it.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-before", action="store_true", help="skip the row path (slow)")
    parser.add_argument("--quick", action="store_true", help="20,000 rows of JSON Lines; print, write nothing")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "FORMAT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, fmt, path = args.child
        result = child(kind, fmt, Path(path))
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return
    if args.quick:
        args.rows, args.formats = [20_000], ["jsonl"]
    load_before = os.getloadavg()[0]
    runs = []
    for rows in args.rows:
        runs += run_size(rows, args.formats, args.repeat, not args.no_before)
    command = ".venv/bin/python bench/ingest.py" + ("" if args.rows == [100_000, 1_000_000]
                                                    else " --rows " + " ".join(map(str, args.rows)))
    if args.formats != list(FORMATS):
        command += " --formats " + " ".join(args.formats)
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2)},
        "date": time.strftime("%Y-%m-%d"), "repeat": args.repeat, "runs": runs, "note": NOTE, "command": command,
    }
    print(markdown(result))
    if not args.quick:
        (ROOT / "bench" / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
        (ROOT / "bench" / "ingest.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
