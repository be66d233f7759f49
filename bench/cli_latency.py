"""How fast the CLI answers: `datamill --help`, `validate`, and `plan` on a cached spec,
next to the CLIs of the peers users run alongside it (mlflow, lm_eval, accelerate).

Run:  .venv/bin/python bench/cli_latency.py     (writes bench/cli_latency.json and .md)
Goal (from the foundation issue): --help and plan on a cached spec under 2 s.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
REPEATS = 5


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def median_of(cmd: list[str]) -> float:
    timed(cmd)  # warm the OS file cache
    return statistics.median(timed(cmd) for _ in range(REPEATS))


def import_time(module: str) -> float:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                         capture_output=True, text=True, check=True)
    total = 0
    for line in out.stderr.splitlines():  # "import time: self | cumulative | name"; top-level lines have no indent
        parts = line.split("|")
        if len(parts) == 3 and not parts[2].startswith("  ") and parts[0].startswith("import time:") \
                and parts[2].strip() == module:
            total = int(parts[1])
    return total / 1e6


def main() -> None:
    quickstart = "examples/clean.yaml"  # the cleaning tour: CLI latency without the long quickstart run
    subprocess.run([str(BIN / "datamill"), "--quiet", "run", quickstart], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # so that `plan` sees a cached spec
    rows = [
        ("datamill --help", [str(BIN / "datamill"), "--help"]),
        ("datamill validate clean", [str(BIN / "datamill"), "validate", quickstart]),
        ("datamill plan clean (cached)", [str(BIN / "datamill"), "plan", quickstart]),
        ("mlflow --help (peer)", [str(BIN / "mlflow"), "--help"]),
        ("accelerate --help (peer)", [str(BIN / "accelerate"), "--help"]),
        ("lm_eval --help (peer)", [str(BIN / "lm_eval"), "--help"]),
    ]
    results = {name: round(median_of(cmd), 3) for name, cmd in rows if shutil.which(cmd[0])}
    imports = {m: round(import_time(m), 3) for m in ("datamill.cli", "datamill.spec", "mlflow", "torch")}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"
    report = {"machine": machine, "repeats": REPEATS, "median_seconds": results, "import_seconds": imports,
              "ratios": {
                  "mlflow --help / datamill --help": round(results["mlflow --help (peer)"] / results["datamill --help"], 2),
                  "lm_eval --help / datamill --help": round(results["lm_eval --help (peer)"] / results["datamill --help"], 2),
              }}
    (ROOT / "bench" / "cli_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# CLI latency ({machine}; median of {REPEATS})", "", "| command | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in results.items()]
    lines += ["", "| import | seconds (cumulative, -X importtime) |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in imports.items()]
    lines += ["", *(f"- {k}: {v}x" for k, v in report["ratios"].items())]
    (ROOT / "bench" / "cli_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
