"""The Ray executor's overhead on one machine: ZIP-FIT scoring of the same candidates by the
`local` executor (datamill's threads over all cores) and by `ray` (candidate slices as Ray tasks
on a local Ray instance with the machine's CPUs), in the same run, scores checked identical.

Reported: best-of-N wall time of each (Ray's start-up reported apart: a cluster is started once,
not per step), the ratio ray / local (goal: <= 1.2 on one machine), and the per-shard timings,
from which the bench's markdown estimates the time on N such machines:
    T(N) ~ total shard seconds / (N x CPUs) + Ray's scheduling overhead measured here
(the step cuts ~4 slices per CPU of the cluster, at least 256 candidates each).

Run:  .venv/bin/python bench/ray_scaling.py            (50,000 x 200 candidates x targets)
      .venv/bin/python bench/ray_scaling.py --quick    (10,000 x 200; prints only)
Needs `pip install 'datamill[ray]'`. Writes bench/ray_scaling.json and bench/ray_scaling.md.
Generation requests are sharded on Ray too but not benchmarked here yet: this bench covers ZIP-FIT scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402  (bench/machine.py)
from zipfit import texts  # noqa: E402  (bench/zipfit.py: the same offline instruction texts)


def best_of(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n, n_targets = (10_000, 200) if args.quick else (50_000, 200)

    import ray

    from datamill.shards import RayShards
    from selection.builtin import zipfit

    candidates = texts(n, 0, None)
    targets = texts(n_targets, 1, ["arithmetic"])
    load_before = os.getloadavg()[0]

    local_s, local_scores = best_of(lambda: zipfit(candidates, targets), args.repeats)

    cpus = os.cpu_count() or 1
    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - start
    shards = RayShards()
    ray.get([ray.remote(lambda: None).remote() for _ in range(cpus)])  # workers up before timing
    ray_s, ray_scores = best_of(lambda: zipfit(candidates, targets, shards=shards), args.repeats)
    per_run = len(shards.seconds) // args.repeats
    last = shards.seconds[-per_run:]  # the shards of the last repeat
    ray.shutdown()

    identical = bool(np.array_equal(local_scores, ray_scores))
    ratio = ray_s / local_s
    total, longest = sum(last), max(last)
    overhead = max(0.0, ray_s - total / cpus)
    estimate = {nodes: round(total / (nodes * cpus) + overhead, 2) for nodes in (1, 2, 4, 8, 16)}
    result = {
        "machine": {"cpu": cpu_name(), "cores": cpus, "python": platform.python_version(),
                    "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2)},
        "candidates": n, "targets": n_targets, "repeats": args.repeats,
        "local_seconds": round(local_s, 3), "ray_seconds": round(ray_s, 3), "ray_over_local": round(ratio, 3),
        "ray_start_seconds": round(ray_start_s, 2), "identical_scores": identical,
        "shards": len(last), "shard_seconds": {"min": round(min(last), 3), "max": round(longest, 3),
                                                "total": round(total, 3)},
        "ray_overhead_seconds": round(overhead, 3), "estimated_seconds_on_nodes": estimate,
    }
    print(json.dumps(result, indent=2))
    if args.quick:
        return
    (ROOT / "bench" / "ray_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        f"# Ray executor overhead on one machine: ZIP-FIT {n:,} x {n_targets} ({m['cpu']}, {cpus} cores, "
        f"Python {m['python']}; best of {args.repeats}; load average {m['load_average_before']} before)",
        "",
        "| executor | seconds | vs local |",
        "|---|---|---|",
        f"| local (threads over {cpus} cores) | {local_s:.2f} | 1.00x |",
        f"| ray ({cpus} CPUs, {len(last)} slices as tasks) | {ray_s:.2f} | {ratio:.2f}x |",
        "",
        f"Scores identical: {identical}. Ray's start-up ({ray_start_s:.1f} s) is not counted: a cluster "
        "is started once per run, not per step. Goal: ray <= 1.2x local on one machine.",
        "",
        f"Shards of one run: {len(last)} slices, {min(last):.2f}-{longest:.2f} s each, {total:.1f} s in all; "
        f"Ray's scheduling and transfer overhead here {overhead:.2f} s. Expected time on N machines like this one "
        f"(T(N) = total / (N x {cpus}) + overhead; the step cuts ~4 slices per CPU, at least 256 candidates each):",
        "",
        "| machines | estimated seconds |",
        "|---|---|",
        *[f"| {nodes} | {seconds} |" for nodes, seconds in estimate.items()],
        "",
        "Not measured yet: the 5,000 fake-server generation requests (generation is sharded on Ray, tested, not benchmarked), multi-node clusters (no second machine here).",
    ]
    (ROOT / "bench" / "ray_scaling.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
