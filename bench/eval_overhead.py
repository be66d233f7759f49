"""Evaluation overhead: datamill's `evaluate` step vs the plain `lm_eval` CLI, same model and task.

Both run as a fresh process, as a user would start them, on the same model folder
(SmolLM2-135M-Instruct, offline), the same shipped task (`datamill_capitals_mc`, 100 rows, 4
choices), batch 16, CPU, no chat template. datamill runs a one-step spec in an empty workspace
(nothing cached), once without tracking and once logging to MLflow (sqlite store, created on
first use). Reported: best-of-N wall time, the ratio to the CLI, and whether the metrics match.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python bench/eval_overhead.py      (~3 min on 2 cores)
Writes bench/eval_overhead.json and bench/eval_overhead.md.
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

from machine import cpu_name, model_cache  # noqa: E402  (bench/machine.py)

TASK = "datamill_capitals_mc"
BIN = Path(sys.executable).parent


def spec(model_dir: Path, tracking: bool) -> str:
    return f"""
name: overhead
models: {{m: {model_dir}}}
steps:
  score:
    evaluate: {{model: m, tasks: [{TASK}], batch_size: 16, device: cpu, apply_chat_template: false}}
tracking: {{enabled: {str(tracking).lower()}}}
"""


def timed_run(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def run_cli(model_dir: Path, folder: Path) -> tuple[float, dict]:
    out = folder / "out"
    seconds = timed_run([str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
                         "--device", "cpu", "--batch_size", "16", "--include_path", str(ROOT / "evals" / "tasks"),
                         "--tasks", TASK, "--output_path", str(out)], folder)
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][TASK]
    return seconds, {"acc": results["acc,none"], "acc_norm": results["acc_norm,none"]}


def run_datamill(model_dir: Path, folder: Path, tracking: bool) -> tuple[float, dict]:
    (folder / "spec.yaml").write_text(spec(model_dir, tracking))
    seconds = timed_run([str(BIN / "datamill"), "run", "spec.yaml"], folder)
    results = json.loads(next(folder.rglob("results.json")).read_text())["results"][TASK]
    return seconds, {"acc": results["acc,none"], "acc_norm": results["acc_norm,none"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    from datamill.models import resolve_model

    model_dir = resolve_model("builtin:smollm2-135m-instruct", base_dir=ROOT, cache_dir=model_cache())
    load_before = os.getloadavg()[0]
    rows = {}
    for name, fn in [("lm_eval CLI", lambda d: run_cli(model_dir, d)),
                     ("datamill evaluate", lambda d: run_datamill(model_dir, d, tracking=False)),
                     ("datamill evaluate + MLflow", lambda d: run_datamill(model_dir, d, tracking=True))]:
        best, metrics = float("inf"), None
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                seconds, metrics = fn(Path(tmp))
            best = min(best, seconds)
        rows[name] = {"seconds": round(best, 2), "metrics": metrics}
        print(f"{name}: {best:.1f} s {metrics}", flush=True)
    peer = rows["lm_eval CLI"]
    for row in rows.values():
        row["ratio_to_cli"] = round(row["seconds"] / peer["seconds"], 3)
        row["same_metrics"] = row["metrics"] == peer["metrics"]
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_1m_before": round(load_before, 2)},
              "date": time.strftime("%Y-%m-%d"), "task": TASK, "model": "builtin:smollm2-135m-instruct",
              "repeat": args.repeat, "rows": rows, "goal_ratio": 1.1,
              "command": "HF_HUB_OFFLINE=1 .venv/bin/python bench/eval_overhead.py"}
    (ROOT / "bench" / "eval_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    (ROOT / "bench" / "eval_overhead.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Evaluation overhead: datamill vs the lm_eval CLI ({m['cpu']}, {m['cores']} cores)", "",
             f"Python {m['python']}, {r['date']}, load average {m['load_avg_1m_before']} before. {r['model']} on "
             f"`{r['task']}` (100 rows, 4 choices), batch 16, CPU, no chat template; each side a fresh process "
             f"(imports and model load included), best of {r['repeat']}.", "",
             "| how | wall time | ratio to the CLI | acc | acc_norm | same metrics |", "|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['seconds']} s | {row['ratio_to_cli']}x | {row['metrics']['acc']} | "
                     f"{row['metrics']['acc_norm']} | {row['same_metrics']} |")
    lines += ["", f"Goal (evals issue): datamill <= {r['goal_ratio']}x the CLI. The CLI indexes lm-eval's ~15k "
              "built-in tasks on every start; datamill indexes only the shipped and included task folders.", "",
              f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
