"""Resuming generation from the request cache at 100k and 1M finished requests: before (the whole-dict
`ShardStore.load`, every record in memory) and after (the compact index; results read back by batch).

The cache: N finished requests written as 4 plain JSONL shards, as earlier runs wrote them (no index
files), records as the generate step writes them (asdict of a GenResult) with `qa`-format texts of
300-700 characters (mean ~500); 1% failed, 2% that do not parse, 1% cut off at max_tokens. Planned: those
N plus R = 1,000 requests never sent. Every phase runs in a fresh process, which reports its seconds (wall and
CPU: the machine is shared), its RSS before the phase (imports and the planned ids) and its peak RSS (VmHWM).

  resume  which planned requests go to the backend. before: load() and the step's old test
          (`results.get(id)` without text); after: index() and lookups by window of 65,536 ids: first on
          the old cache (which writes its index files, once), then with them. `finished_resent` counts
          successful requests that would be sent again (must be 0); `to_send` is R plus the failed ones.
  tables  the step's two tables for all N + R planned requests. before: `_tables` over the whole dict,
          one pass (the step's old path); after: `_write_tables` window by window (batches read back by
          offset, written with TableWriter). Planned requests are synthetic (a prompt, a draw, an id) so
          that rendering N prompts is not what is timed. The digests of the written tables must be equal.
  step    after only: `datamill run` of a real generate spec (openai backend, the fake server of
          tests/fake_openai_server.py), its cache pre-filled with N of its N + R requests (and indexed, as
          a killed run's shard is): `sent` must be R plus the failed ones. Its seconds include planning
          (rendering each prompt, ~0.1 ms a request here) and parsing every result into the tables.

Run:  .venv/bin/python bench/gencache.py [--sizes 100000 1000000] [--step-sizes 100000]
      (writes bench/gencache.json and bench/gencache.md)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name, start_fake_server  # bench/machine.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REMAINDER = 1_000
SHARDS = 4
MODEL = "fake-model"


# ---- the cache ------------------------------------------------------------------------------

def request_ids(total: int) -> list[str]:
    """Ids shaped like the step's (24 hex digits of a sha256)."""
    return [hashlib.sha256(f"bench:{k}".encode()).hexdigest()[:24] for k in range(total)]


def record(request_id: str, k: int, rng: random.Random) -> dict:
    """A finished request as the step writes it: mostly parseable `qa` texts of ~500 characters."""
    words = "the of a to in is that for on with as by at from it an be this which or are".split()
    question = " ".join(rng.choice(words) for _ in range(rng.randint(25, 60)))
    answer = " ".join(rng.choice(words) for _ in range(rng.randint(35, 80)))
    base = {"id": request_id, "error": None, "tokens_in": 120, "tokens_out": 140, "attempts": 1}
    roll = rng.random()
    if roll < 0.01:
        return {**base, "text": None, "error": "HTTP 500 after 7 attempts", "tokens_out": 0, "attempts": 7,
                "finish_reason": None}
    if roll < 0.03:
        return {**base, "text": f"Here are some topics for request {k}: " + answer, "finish_reason": "stop"}
    text = f"1. Algebra\n2. Geometry\n\nQuestion: {question}?\nAnswer: {answer}."
    return {**base, "text": text, "finish_reason": "length" if roll < 0.04 else "stop"}


def write_cache(folder: Path, ids: list[str], seed: int = 0) -> dict:
    """`ids` finished, in SHARDS plain JSONL shards (consecutive ranges: runs that grew n), each shard's
    lines shuffled within blocks of 256 (results arrive out of order within what is in flight)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    size = -(-len(ids) // SHARDS)
    for s in range(SHARDS):
        ks = list(range(s * size, min(len(ids), (s + 1) * size)))
        for i in range(0, len(ks), 256):
            block = ks[i:i + 256]
            rng.shuffle(block)
            ks[i:i + 256] = block
        with open(folder / f"shard-{1000 + s}-{s}.jsonl", "w", encoding="utf-8") as out:
            for k in ks:
                out.write(json.dumps(record(ids[k], k, rng), ensure_ascii=False, separators=(",", ":")) + "\n")
    return {"jsonl_bytes": sum(p.stat().st_size for p in folder.glob("*.jsonl"))}


# ---- phases (each in a fresh process) ----------------------------------------------------------

def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def phase_resume(cache: Path, n: int, how: str) -> dict:
    from datagen.shards import ShardStore

    ids = request_ids(n + REMAINDER)
    before_mb = rss_mb("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    store = ShardStore(cache)
    if how == "before":
        results = store.load()  # the step's old resume
        todo = [i for i in ids if (results.get(i) or {}).get("text") is None]
        held = len(results)
    else:
        index = store.index()
        todo = []
        for first in range(0, len(ids), 65_536):
            window = ids[first:first + 65_536]
            _, ok = index.lookup(window)
            todo += [i for i, done in zip(window, ok) if not done]
        held = len(index)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = rss_mb("VmHWM")
    # Not timed, after the peak: which of the requests to send had finished, by the whole-dict reading
    # (which writes no index files, so the next phase still finds the cache as this one did).
    whole = ShardStore(cache).load()
    finished = sum(1 for i in todo if (whole.get(i) or {}).get("text") is not None)
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "rss_before_mb": before_mb,
            "rss_peak_mb": peak, "to_send": len(todo),
            "finished_resent": finished, "records_indexed": held,
            "torn_lines": store.torn_lines}


def synthetic_plan(ids: list[str], first: int, stop: int, prompt):
    from datagen.backends.base import GenRequest
    from datagen.generate_step import PlannedRequest
    from datagen.prompt_library import Draw

    return [PlannedRequest(k, prompt, Draw(index=k % 50 + 1, subindex=None, topic=None),
                           GenRequest(id=ids[k], messages=[], temperature=1.0, top_p=0.95, max_tokens=768, seed=k))
            for k in range(first, stop)]


def phase_tables(cache: Path, n: int, how: str, out_dir: Path) -> dict:
    from types import SimpleNamespace

    from datagen import generate_step, prompt_library
    from datagen.generate_step import GenerateConfig, GenerateStep
    from datagen.shards import ShardStore
    from datamill.step import TableWriter

    total = n + REMAINDER
    ids = request_ids(total)
    prompt = prompt_library.load("math", ROOT)
    step = GenerateStep("gen", GenerateConfig(model=MODEL, backend="openai", prompts=["math"], n=total))
    ctx = SimpleNamespace(name="gen")
    main, rejected = out_dir / f"{how}-main.parquet", out_dir / f"{how}-rejected.parquet"
    before_mb = rss_mb("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    store = ShardStore(cache)
    if how == "before":
        planned = synthetic_plan(ids, 0, total, prompt)  # the old step planned every request up front
        rows, rejects = step._tables(ctx, planned, store.load())
        rows.write_parquet(main)
        rejects.write_parquet(rejected)
    else:
        index = store.index()
        tally = generate_step._Tally()
        with TableWriter(main) as out, TableWriter(rejected) as out_rejected:
            for first in range(0, total, generate_step.WINDOW):
                planned = synthetic_plan(ids, first, min(total, first + generate_step.WINDOW), prompt)
                step._write_tables(ctx, planned, index, {}, out, out_rejected, tally)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = rss_mb("VmHWM")
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "rss_before_mb": before_mb, "rss_peak_mb": peak,
            "main": digest(main), "rejected": digest(rejected)}


def digest(path: Path) -> dict:
    """Rows, columns and an order-sensitive hash of a Parquet table, read in batches."""
    import polars as pl
    import pyarrow.parquet as pq

    h, rows = hashlib.sha256(), 0
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=65_536):
        df = pl.from_arrow(batch)
        h.update(df.hash_rows(seed=0).to_numpy().tobytes())
        rows += df.height
    h.update(str(pl.read_parquet_schema(path)).encode())
    return {"rows": rows, "sha256": h.hexdigest()[:16], "bytes": path.stat().st_size}


STEP_SPEC = """\
name: genbench
tracking: {{enabled: false}}
steps:
  gen:
    generate:
      model: {model}
      backend: openai
      prompts: [math, academic]
      n: {n}
      max_tokens: 512
      openai: {{base_url: "{base_url}", max_in_flight: 64}}
"""


def phase_prefill(folder: Path, n: int, base_url: str) -> dict:
    """Plan the spec's requests as the step does and write the first n of them to its cache."""
    from datagen import prompt_library
    from datagen.generate_step import GenerateConfig, cache_folder_name, plan_requests

    config = GenerateConfig(model=MODEL, backend="openai", prompts=["math", "academic"], n=n + REMAINDER,
                            max_tokens=512)
    identity = f"openai:{MODEL}"
    start = time.perf_counter()
    planned = plan_requests(config, [prompt_library.load(p, ROOT) for p in config.prompts], identity)
    plan_seconds = time.perf_counter() - start
    cache = folder / ".datamill" / "genbench" / "shared" / "generate" / "openai" / cache_folder_name(MODEL, identity)
    sizes = write_cache(cache, [p.request.id for p in planned[:n]])
    from datagen.shards import ShardStore

    ShardStore(cache).index()  # indexes the shards, as a killed run's own shard is (but for its last second)
    return {"plan_seconds": round(plan_seconds, 2), **sizes}


def phase_step(folder: Path) -> dict:
    import datamill

    start = time.perf_counter()
    result = datamill.run(folder / "spec.yaml", quiet=True)
    seconds = time.perf_counter() - start
    stats = result.points[0].steps["gen"].stats
    return {"seconds": round(seconds, 2), "rss_peak_mb": rss_mb("VmHWM"),
            **{k: stats[k] for k in ("requests_total", "requests_cached", "sent", "failed", "parsed", "rejected",
                                     "resent_failed", "generate_seconds", "torn_lines")}}


# ---- the driver --------------------------------------------------------------------------------

def in_process(*args: str) -> dict:
    """Run one phase in a fresh Python process; its JSON answer."""
    out = subprocess.run([sys.executable, __file__, "--phase", *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode:
        raise RuntimeError(f"phase {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_size(n: int, work: Path) -> dict:
    cache, tables = work / f"cache-{n}", work / f"tables-{n}"
    tables.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sizes = write_cache(cache, request_ids(n))
    print(f"{n:,}: cache written in {time.perf_counter() - started:.0f} s ({sizes['jsonl_bytes'] / 1e6:.0f} MB)",
          flush=True)
    row = {"finished": n, "remainder": REMAINDER, **sizes}
    row["resume_before"] = in_process("resume", str(cache), str(n), "before")
    print(" resume before", row["resume_before"], flush=True)
    row["resume_after_first_use"] = in_process("resume", str(cache), str(n), "after")  # writes the indexes
    row["index_bytes"] = sum(p.stat().st_size for p in cache.glob("*.idx"))
    print(" resume after (first use)", row["resume_after_first_use"], flush=True)
    row["resume_after"] = in_process("resume", str(cache), str(n), "after")
    print(" resume after", row["resume_after"], flush=True)
    row["tables_before"] = in_process("tables", str(cache), str(n), "before", str(tables))
    print(" tables before", row["tables_before"], flush=True)
    row["tables_after"] = in_process("tables", str(cache), str(n), "after", str(tables))
    print(" tables after", row["tables_after"], flush=True)
    row["tables_identical"] = all(row["tables_before"][t] | {"bytes": 0} == row["tables_after"][t] | {"bytes": 0}
                                  for t in ("main", "rejected"))
    shutil.rmtree(cache)
    shutil.rmtree(tables)
    return row


def measure_step(n: int, work: Path, base_url: str) -> dict:
    folder = work / f"step-{n}"
    folder.mkdir(parents=True)
    (folder / "spec.yaml").write_text(STEP_SPEC.format(model=MODEL, n=n + REMAINDER, base_url=base_url))
    row = {"finished": n, "remainder": REMAINDER, "prefill": in_process("prefill", str(folder), str(n), base_url)}
    print(f"step {n:,}: prefill", row["prefill"], flush=True)
    row["run"] = in_process("step", str(folder))
    print(" run", row["run"], flush=True)
    shutil.rmtree(folder)
    return row


def machine() -> dict:
    from importlib.metadata import version

    return {"cpu": cpu_name(), "nproc": os.cpu_count(), "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}", "numpy": version("numpy"),
            "polars": version("polars")}


def main(sizes: list[int], step_sizes: list[int]) -> None:
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="gencache-bench-"))
    rows, steps = [], []
    try:
        for n in sizes:
            rows.append(measure_size(n, work))
        if step_sizes:
            server, base_url = start_fake_server()
            try:
                for n in step_sizes:
                    steps.append(measure_step(n, work, base_url))
            finally:
                server.terminate()
                server.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = machine()
    info["load_average_1min"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    report = {"machine": info, "remainder": REMAINDER, "shards": SHARDS, "cache": rows, "step": steps}
    (ROOT / "bench" / "gencache.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report)


def secs(phase: dict) -> str:
    return f"{phase['seconds']} ({phase['cpu_seconds']} CPU)"


def mb(phase: dict) -> str:
    return f"{phase['rss_peak_mb']:,.0f} ({phase['rss_before_mb']:,.0f})"


def write_markdown(report: dict) -> None:
    info = report["machine"]
    lines = [f"# Generation request cache: resume at scale ({info['platform']}, {info['nproc']} cores, "
             f"{info['cpu']}, Python {info['python']})", "",
             f"A cache of N finished requests (texts ~500 characters; 1% failed) in {report['shards']} plain "
             f"JSONL shards as earlier runs wrote them, plus {report['remainder']:,} planned requests never sent. "
             "Each figure is one fresh process: wall seconds of the phase (CPU seconds in brackets: the "
             "machine is shared), peak RSS (VmHWM) in MB (in brackets, RSS before the phase: imports and the "
             "planned ids). Before: `ShardStore.load()`, every record in one dict, as the step resumed until "
             "now; after: the shards' compact index. See bench/gencache.py.", "",
             "## Resume: which planned requests to send", "",
             "| N finished | cache | before: load() s | before: peak RSS | after, first use of the old "
             "shards (indexes them) s | after s | after: peak RSS | index files | to send | finished re-sent "
             "(before / after) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["cache"]:
        b, f, a = r["resume_before"], r["resume_after_first_use"], r["resume_after"]
        lines.append(f"| {r['finished']:,} | {r['jsonl_bytes'] / 1e6:,.0f} MB | {secs(b)} | {mb(b)} | {secs(f)} "
                     f"| {secs(a)} | {mb(a)} | {r['index_bytes'] / 1e6:,.1f} MB | {a['to_send']:,} "
                     f"| {b['finished_resent']} / {a['finished_resent']} |")
    lines += ["", "To send: the remainder plus the failed requests (retried). Finished re-sent: requests to send "
                  "that have a success in the cache (by `load()`): must be 0.",
              "", "## The step's tables for all N + remainder planned requests", "",
              "| N finished | before: whole dict s | before: peak RSS | after: streamed s | after: peak RSS "
              "| rows / rejected | identical |", "|---|---|---|---|---|---|---|"]
    for r in report["cache"]:
        b, a = r["tables_before"], r["tables_after"]
        same = "yes" if r["tables_identical"] else "NO"
        lines.append(f"| {r['finished']:,} | {secs(b)} | {mb(b)} | {secs(a)} | {mb(a)} "
                     f"| {a['main']['rows']:,} / {a['rejected']['rows']:,} | {same} |")
    lines += ["", "Identical: same rows, order and columns (a digest of every row, batch by batch, and the schema). "
                  "Most of both is parsing each result and hashing its messages (`_tables`, unchanged). After: the "
                  "peak is one window of 65,536 requests, the index, and `TableWriter.close` (datamill/step.py) "
                  "joining the parts with Polars' streaming sink, which alone raised the peak by ~200 MB at 300k "
                  "rows (measured separately); the extra CPU (2-14%) is that second Parquet pass and the reads "
                  "by offset."]
    if report["step"]:
        lines += ["", "## `datamill run` against the fake OpenAI server, cache pre-filled (after only)", "",
                  "| N finished | planning N + remainder (in the prefill) s | run s | run: peak RSS MB | requests "
                  "cached | sent | parsed / rejected |", "|---|---|---|---|---|---|---|"]
        for r in report["step"]:
            p, s = r["prefill"], r["run"]
            lines.append(f"| {r['finished']:,} | {p['plan_seconds']} | {s['seconds']} | {s['rss_peak_mb']:,.0f} "
                         f"| {s['requests_cached']:,} | {s['sent']:,} | {s['parsed']:,} / {s['rejected']:,} |")
        lines += ["", "The run plans every request again (rendering its prompt: the prefill column), reads the cache "
                      "and parses every result into the tables; sent = the remainder plus the failed requests."]
    lines += ["", f"Note: a {info['nproc']}-core machine shared with other work: 1-minute load average "
                  f"{info['load_average_1min']['before']} before, {info['load_average_1min']['after']} after; "
                  "wall seconds move between sessions, CPU seconds and RSS much less."]
    (ROOT / "bench" / "gencache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", nargs="+")
    parser.add_argument("--sizes", nargs="*", type=int, default=[100_000, 1_000_000])
    parser.add_argument("--step-sizes", nargs="*", type=int, default=[100_000])
    args = parser.parse_args()
    if args.phase:
        name, *rest = args.phase
        if name == "resume":
            answer = phase_resume(Path(rest[0]), int(rest[1]), rest[2])
        elif name == "tables":
            answer = phase_tables(Path(rest[0]), int(rest[1]), rest[2], Path(rest[3]))
        elif name == "prefill":
            answer = phase_prefill(Path(rest[0]), int(rest[1]), rest[2])
        else:
            answer = phase_step(Path(rest[0]))
        print(json.dumps(answer))
    else:
        main(args.sizes, args.step_sizes)
