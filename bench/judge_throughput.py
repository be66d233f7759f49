"""Judge throughput: the `judge` step's requests/s against the `generate` step's own, same server.

A fake OpenAI-compatible server (tests/fake_openai_server.py, its own process) answers every
chat completion at once. The same table of N conversations goes through two steps, each run as a
whole (`Step.run` on a StepContext, each in a fresh process, a fresh request cache: every request
is sent): `generate` responding to the table's prompts (input mode) and `judge` scoring the rows
(pointwise, the helpfulness template: longer prompts, and a verdict to parse per row). For 64 and
256 requests in flight, the median of 3 runs each (steps interleaved). Two rates per run:
  send      the step's `requests_per_s` stat: requests over the time spent sending them;
  overall   requests over the step's whole run (reading the input, the cache, writing tables).
Goal (issue 20): judge >= 0.9x generate. The fake server's answers are not verdicts, so the judge
rejects every row (parsing is still done per row; the rejected table is written).

Run:  .venv/bin/python bench/judge_throughput.py      (~1 min; writes bench/judge_throughput.json and .md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name, start_fake_server  # bench/machine.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
N_REQUESTS = 2000
IN_FLIGHT = (64, 256)
REPEATS = 3
STEPS = ("generate", "judge")


def conversations(n: int):
    import polars as pl

    from datamill.records import row_id

    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Explain topic #{i} to a student in a short paragraph, "
                                                 "with one example. " * 2},
                    {"role": "assistant", "content": f"Topic #{i} is about ... For example, ... " * 4}]
        rows.append({"id": row_id(messages), "messages": messages, "n": i})
    return pl.DataFrame(rows)


def run_step_once(step: str, base_url: str, n: int, in_flight: int) -> dict:
    """One step over n rows in a fresh workspace: its send rate and its whole run's seconds."""
    from datagen.generate_step import GenerateStep
    from datagen.judge_step import JudgeStep
    from datamill.step import Env, StepContext

    cls = {"generate": GenerateStep, "judge": JudgeStep}[step]
    config = {"model": "fake-model", "backend": "openai", "input": "pool", "max_tokens": 256,
              "openai": {"base_url": base_url, "max_in_flight": in_flight}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table = tmp / "pool.parquet"
        conversations(n).write_parquet(table)
        instance = cls(step, cls.Config.model_validate(config))
        ctx = StepContext(name=step, kind=instance.kind, key="bench", out_dir=tmp / "out", state_dir=tmp / "state",
                          shared_dir=tmp / "shared", env=Env(base_dir=tmp), input_paths={"pool": table},
                          model_paths={})
        start = time.perf_counter()
        instance.run(ctx)
        seconds = time.perf_counter() - start
    assert ctx.stats["sent"] == n, ctx.stats
    return {"send_rps": ctx.stats["requests_per_s"], "overall_rps": round(n / seconds, 1)}


def measure(step: str, base_url: str, in_flight: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--step", step, "--base-url", base_url,
                          "--in-flight", str(in_flight), "--n", str(N_REQUESTS)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise RuntimeError(f"{step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    load_before = os.getloadavg()[0]
    server, base_url = start_fake_server()
    runs: dict[str, dict[str, list[dict]]] = {}
    try:
        for in_flight in IN_FLIGHT:
            runs[str(in_flight)] = {step: [] for step in STEPS}
            for _ in range(REPEATS):
                for step in STEPS:
                    result = measure(step, base_url, in_flight)
                    runs[str(in_flight)][step].append(result)
                    print(f"in-flight {in_flight} {step}: send {result['send_rps']:.0f} req/s, "
                          f"overall {result['overall_rps']:.0f} req/s", flush=True)
    finally:
        server.terminate()
        server.wait()

    results = []
    for in_flight, by_step in runs.items():
        row = {"in_flight": int(in_flight), "requests": N_REQUESTS, "runs": by_step}
        for rate in ("send_rps", "overall_rps"):
            gen = statistics.median(r[rate] for r in by_step["generate"])
            jud = statistics.median(r[rate] for r in by_step["judge"])
            row[f"generate_{rate}"], row[f"judge_{rate}"] = gen, jud
            row[f"ratio_{rate}"] = round(jud / gen, 3)
        results.append(row)
    from importlib.metadata import version

    info = {"cpu": cpu_name(), "nproc": os.cpu_count(), "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}", "aiohttp": version("aiohttp"),
            "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}}
    report = {"machine": info, "repeats": REPEATS, "goal": "judge / generate >= 0.9 (send rate)", "results": results}
    (ROOT / "bench" / "judge_throughput.json").write_text(json.dumps(report, indent=2) + "\n")

    lines = [f"# Judge throughput vs generate ({info['platform']}, {info['nproc']} cores, {info['cpu']}, "
             f"Python {info['python']}; median of {REPEATS})", "",
             f"{N_REQUESTS:,} rows through each step against a local OpenAI-compatible server that answers at once "
             "(tests/fake_openai_server.py, its own process), each run a fresh process and a fresh request cache. "
             "generate: responding to the rows' prompts (input mode); judge: pointwise, helpfulness template. "
             "Send: the step's requests_per_s (time spent sending); overall: requests over the whole step run.", "",
             "| in flight | generate send (req/s) | judge send (req/s) | judge / generate | generate overall (req/s) "
             "| judge overall (req/s) | judge / generate |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['in_flight']} | {r['generate_send_rps']:.0f} | {r['judge_send_rps']:.0f} | "
                     f"{r['ratio_send_rps']:.2f}x | {r['generate_overall_rps']:.0f} | {r['judge_overall_rps']:.0f} | "
                     f"{r['ratio_overall_rps']:.2f}x |")
    lines += ["", f"Goal (issue 20): judge / generate >= 0.9x. A {info['nproc']}-core machine shared by server and "
                  "client (and other work): absolute figures are a lower bound, the ratios are the comparison. "
                  f"1-minute load average {info['load_average_1min']['before']} before, "
                  f"{info['load_average_1min']['after']} after."]
    (ROOT / "bench" / "judge_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", choices=STEPS)
    parser.add_argument("--base-url")
    parser.add_argument("--in-flight", type=int)
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(run_step_once(args.step, args.base_url, args.n, args.in_flight)))
    else:
        main()
