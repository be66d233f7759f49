"""The Ray executor's overhead on one machine, in two halves, each checked to give the same output
on `local` and on `ray` (a local Ray instance with the machine's CPUs, started once: its start-up
is reported apart, a cluster is started once per run, not per step):

1. ZIP-FIT scoring of the same candidates by the `local` executor (datamill's threads over all
   cores) and by `ray` (candidate slices as Ray tasks), in the same run, scores checked identical.
2. Generation: the real `generate` step (`datamill.run` of a one-step spec, tracking off) sending
   requests to the tests' fake OpenAI-compatible server (tests/fake_openai_server.py, its own
   process, answering each request after a fixed delay, like a real endpoint's latency), once with
   `executor: {kind: local}` (one aiohttp client, `max_in_flight` requests at once) and once with
   `{kind: ray}` (request slices as Ray tasks, each its own client), each run in a fresh workspace
   (the request cache lives there: a second run in the same one would be all cache hits); the
   output and rejected tables checked equal. The same spec on both: `max_in_flight` is the total
   on either executor (on Ray split between the tasks running at once), so both have as many
   requests out at once and the ratio is Ray's overhead.

Reported: best-of-N wall time of each, the ratio ray / local (goal: <= 1.2 on one machine), and the
per-shard timings, from which the bench's markdown estimates the time on N such machines:
    T(N) ~ total shard seconds / (N x CPUs) + Ray's scheduling overhead measured here
(the steps cut ~4 slices per CPU of the cluster; ZIP-FIT slices hold at least 256 candidates).
Generation is bound by max_in_flight / latency whatever N (the total in flight stays the spec's),
so its estimate is for the spec scaled with the cluster, max_in_flight x N, assuming the endpoint
answers N times the requests at the same latency; the spec unchanged is shown beside it. Its floor
is the endpoint's throughput: T(N) >= requests / (requests/s it serves).

Run:  .venv/bin/python bench/ray_scaling.py            (ZIP-FIT 50,000 x 200; 5,000 requests)
      .venv/bin/python bench/ray_scaling.py --quick    (ZIP-FIT 10,000 x 200; 1,000 requests; prints only)
      .venv/bin/python bench/ray_scaling.py --only generation   (keeps the ZIP-FIT results of the JSON)
Needs `pip install 'datamill[ray]'`. Writes bench/ray_scaling.json and bench/ray_scaling.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_name, start_fake_server  # noqa: E402  (bench/machine.py)
from zipfit import texts  # noqa: E402  (bench/zipfit.py: the same offline instruction texts)

JSON_PATH = ROOT / "bench" / "ray_scaling.json"
MD_PATH = ROOT / "bench" / "ray_scaling.md"
NODES = (1, 2, 4, 8, 16)
MAX_IN_FLIGHT = 64  # the generate step's default (openai.max_in_flight)
GEN_STEP = "genqa"
WARM_UP = 64  # requests of the untimed first run of each executor


def best_of(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ---- generation: the fake endpoint and one run of the generate step ----



SPEC = """\
name: gen_{executor}
tracking: {{enabled: false}}
executor: {{kind: {executor}}}
steps:
  {step}:
    generate: {{model: fake-model, backend: openai, prompts: [general, math], n: {n}, temperature: 0.7,
               openai: {{base_url: "{base_url}", max_in_flight: {in_flight}}}}}
"""


def generate_once(base_url: str, n: int, executor: str, in_flight: int) -> tuple[float, dict, dict]:
    """One `datamill.run` in a fresh workspace: (wall seconds, the step's stats, its tables)."""
    import polars as pl

    import datamill

    with tempfile.TemporaryDirectory(prefix=f"ray_scaling_{executor}_") as folder:
        spec = Path(folder) / "spec.yaml"
        spec.write_text(SPEC.format(executor=executor, step=GEN_STEP, n=n, base_url=base_url, in_flight=in_flight))
        start = time.perf_counter()
        result = datamill.run(spec, quiet=True)
        seconds = time.perf_counter() - start
        stats = dict(result.points[0].steps[GEN_STEP].stats)
        tables = {name: pl.read_parquet(result.tables[name]) for name in (GEN_STEP, f"{GEN_STEP}__rejected")}
    return seconds, stats, tables


def generate_best_of(base_url: str, n: int, executor: str, in_flight: int, repeats: int) -> dict:
    runs = [generate_once(base_url, n, executor, in_flight) for _ in range(repeats)]
    best = min(runs, key=lambda run: run[0])
    return {"seconds": best[0], "all_seconds": [round(run[0], 2) for run in runs], "stats": best[1],
            "tables": best[2], "runs": runs}


def same_tables(a: dict, b: dict) -> bool:
    return all(a[name].equals(b[name]) for name in a)


def shard_estimate(total: float, wall: float, cpus: int) -> tuple[float, dict]:
    """Ray's overhead here (wall beyond the shards' work spread over the CPUs) and T(N) on N machines."""
    overhead = max(0.0, wall - total / cpus)
    return overhead, {nodes: round(total / (nodes * cpus) + overhead, 2) for nodes in NODES}


# ---- the halves ----

def zipfit_local(n: int, n_targets: int, repeats: int) -> dict:
    from selection.builtin import zipfit

    candidates, targets = texts(n, 0, None), texts(n_targets, 1, ["arithmetic"])
    load = os.getloadavg()[0]
    local_s, scores = best_of(lambda: zipfit(candidates, targets), repeats)
    return {"candidates": candidates, "targets": targets, "load_before": load, "local_s": local_s, "scores": scores}


def zipfit_ray(part: dict, repeats: int, cpus: int) -> dict:
    from datamill.shards import RayShards
    from selection.builtin import zipfit

    shards = RayShards()
    load_ray = os.getloadavg()[0]
    ray_s, ray_scores = best_of(lambda: zipfit(part["candidates"], part["targets"], shards=shards), repeats)
    per_run = len(shards.seconds) // repeats
    last = shards.seconds[-per_run:]  # the shards of the last repeat
    total, longest = sum(last), max(last)
    overhead, estimate = shard_estimate(total, ray_s, cpus)
    local_s = part["local_s"]
    return {
        "measured_at": today(), "cpu": cpu_name(), "candidates": len(part["candidates"]), "targets": len(part["targets"]),
        "repeats": repeats, "load_average_before": round(part["load_before"], 2),
        "load_average_before_ray": round(load_ray, 2), "load_average_after": round(os.getloadavg()[0], 2),
        "local_seconds": round(local_s, 3), "ray_seconds": round(ray_s, 3), "ray_over_local": round(ray_s / local_s, 3),
        "identical_scores": bool(np.array_equal(part["scores"], ray_scores)),
        "shards": len(last), "shard_seconds": {"min": round(min(last), 3), "max": round(longest, 3),
                                                "total": round(total, 3)},
        "ray_overhead_seconds": round(overhead, 3), "estimated_seconds_on_nodes": estimate,
    }


def generation_estimate(n: int, cpus: int, per_task: int, delay_s: float, shard_total: float, wall: float,
                        in_flight_on: Callable[[int], int]) -> dict:
    """Generation on N machines like this one, from the shard timings of the run here (`per_task`
    requests out per task). A shard of s requests with m out at once waits ceil(s / m) rounds of the
    endpoint's latency, plus a cost of its own (`per_shard`: its client, parsing answers, results
    sent back), measured here as shard time beyond the rounds; each CPU runs ~4 shards one after
    the other (the step cuts ~4 slices per CPU of the cluster). On N machines the spec's
    max_in_flight, `in_flight_on(N)` in all, is split between the N x CPUs tasks running at once
    (m = ceil(max_in_flight / (N x CPUs)), as GenerateStep._per_task does):
        T(N) = ceil(shards / (N x CPUs)) x (ceil(s / m) x latency + per_shard) + driver overhead
    with the driver overhead (planning, the tables) measured here too. Once a shard has fewer
    requests than m, its rounds cannot shrink any more."""
    def sizes(workers: int) -> list[int]:  # LocalShards.slices: ~4 per worker
        size = -(-n // (4 * workers))
        return [min(size, n - i) for i in range(0, n, size)]

    measured = sizes(cpus)
    waiting = sum(-(-s // per_task) * delay_s for s in measured)
    per_shard = max(0.0, (shard_total - waiting) / len(measured))
    driver = max(0.0, wall - shard_total / cpus)
    out = {}
    for nodes in NODES:
        workers, total = nodes * cpus, in_flight_on(nodes)
        share = max(1, -(-total // workers))
        cut = sizes(workers)
        shard_s = -(-cut[0] // share) * delay_s + per_shard
        out[nodes] = {"seconds": round(-(-len(cut) // workers) * shard_s + driver, 2), "shards": len(cut),
                      "requests_per_shard": cut[0], "max_in_flight": total, "max_in_flight_per_task": share,
                      "in_flight": workers * min(share, cut[0]),
                      "endpoint_requests_per_s": round(workers * min(share, cut[0]) / delay_s)}
    return {"per_shard_seconds": round(per_shard, 3), "driver_seconds": round(driver, 3), "nodes": out}


def generation_result(n: int, delay_s: float, repeats: int, cpus: int, loads: dict,
                      local: dict, ray: dict, per_task: int) -> dict:
    reference = local["runs"][0][2]
    identical = {
        "local_repeats": all(same_tables(reference, run[2]) for run in local["runs"][1:]),
        "ray": all(same_tables(reference, run[2]) for run in ray["runs"]),
    }
    rows = {name: reference[name].height for name in reference}
    stats = ray["stats"]
    total = stats["shard_seconds"]["total"]
    overhead, _ = shard_estimate(total, ray["seconds"], cpus)

    def estimate(in_flight_on: Callable[[int], int]) -> dict:
        return generation_estimate(n, cpus, per_task, delay_s, total, ray["seconds"], in_flight_on)

    return {
        "measured_at": today(), "requests": n, "server_delay_seconds": delay_s, "repeats": repeats,
        **{key: round(value, 2) for key, value in loads.items()}, "rows": rows,
        "local": {"max_in_flight": MAX_IN_FLIGHT, "in_flight_at_once": MAX_IN_FLIGHT,
                  "seconds": round(local["seconds"], 3), "all_seconds": local["all_seconds"],
                  "executor": local["stats"].get("executor")},
        "ray": {"max_in_flight": MAX_IN_FLIGHT, "max_in_flight_per_task": per_task,
                "in_flight_at_once": min(MAX_IN_FLIGHT, per_task * cpus),
                "seconds": round(ray["seconds"], 3), "all_seconds": ray["all_seconds"],
                "ray_over_local": round(ray["seconds"] / local["seconds"], 3),
                "executor": stats.get("executor"), "shards": stats.get("shards"),
                "shard_seconds": stats.get("shard_seconds"), "ray_overhead_seconds": round(overhead, 3),
                # the spec's max_in_flight raised with the cluster (x N), and the spec unchanged
                "estimate": estimate(lambda nodes: MAX_IN_FLIGHT * nodes),
                "estimate_same_spec": estimate(lambda nodes: MAX_IN_FLIGHT)},
        "identical_tables": identical,
    }


# ---- the report ----

def load_text(section: dict) -> str:
    """The 1-minute load average around a half's runs, as far as the JSON has it."""
    parts = [f"{section[key]} {label}" for key, label in (
        ("load_average_before", "before the local runs" if "load_average_before_ray" in section else "before"),
        ("load_average_before_ray", "before the Ray runs"), ("load_average_after", "after")) if section.get(key) is not None]
    return "load average " + ", ".join(parts)


def markdown(result: dict, zipfit_rerun: bool) -> str:
    m, z, g = result["machine"], result, result["generation"]
    cpus = m["cores"]
    zest, zsh = z["estimated_seconds_on_nodes"], z["shard_seconds"]
    when = (f"measured {z['measured_at']}" if z.get("measured_at") else "measured in an earlier run of this bench") + \
        ("" if zipfit_rerun else "; not re-run with the generation half")
    if z.get("cpu") and z["cpu"] != m["cpu"]:
        when += f"; on another machine: {z['cpu']}, {cpus} cores"
    lines = [
        f"# Ray executor overhead on one machine ({m['cpu']}, {cpus} cores, Python {m['python']})",
        "",
        f"Ray ({cpus} CPUs, a local instance) started in {m['ray_start_seconds']:.1f} s; not counted below: a cluster is "
        "started once per run, not per step. Goal: ray <= 1.2x local on one machine. Load averages: the 1-minute "
        "figure, which counts this bench's own runs too (other work shares the machine).",
        "",
        f"## ZIP-FIT scoring, {z['candidates']:,} candidates x {z['targets']} targets "
        f"(best of {z['repeats']}; {load_text(z)}; {when})",
        "",
        "| executor | seconds | vs local |",
        "|---|---|---|",
        f"| local (threads over {cpus} cores) | {z['local_seconds']:.2f} | 1.00x |",
        f"| ray ({cpus} CPUs, {z['shards']} slices as tasks) | {z['ray_seconds']:.2f} | {z['ray_over_local']:.2f}x |",
        "",
        f"Scores identical: {z['identical_scores']}.",
        "",
        f"Shards of one run: {z['shards']} slices, {zsh['min']:.2f}-{zsh['max']:.2f} s each, {zsh['total']:.1f} s in all; "
        f"Ray's scheduling and transfer overhead here {z['ray_overhead_seconds']:.2f} s. Expected time on N machines like "
        f"this one (T(N) = total / (N x {cpus}) + overhead; the step cuts ~4 slices per CPU, at least 256 candidates each):",
        "",
        "| machines | estimated seconds |",
        "|---|---|",
        *[f"| {nodes} | {seconds} |" for nodes, seconds in zest.items()],
        "",
    ]
    if g is None:
        return "\n".join(lines + ["Generation: not measured yet (run without --only zipfit)."]) + "\n"
    loc, ray = g["local"], g["ray"]
    ident = g["identical_tables"]
    est, fixed = ray["estimate"], ray["estimate_same_spec"]

    def node(e: dict, nodes: int) -> dict:  # int keys in memory, str keys once read back from the JSON
        return e["nodes"][nodes] if nodes in e["nodes"] else e["nodes"][str(nodes)]

    last, first_fixed, last_fixed = node(est, max(NODES)), node(fixed, min(NODES)), node(fixed, max(NODES))
    n, delay = g["requests"], g["server_delay_seconds"]
    rows = g["rows"]
    s = ray["shard_seconds"]
    lines += [
        f"## Generation, {n:,} requests to a fake OpenAI-compatible server "
        f"(best of {g['repeats']}; {load_text(g)}; measured {g['measured_at']})",
        "",
        f"The real `generate` step (`datamill.run` of a one-step spec, tracking off, each run in a fresh workspace so "
        f"nothing comes from the request cache; prompts general + math, temperature 0.7) against tests/fake_openai_server.py "
        f"in its own process, answering every request after {delay} s (a real endpoint's latency is 0.1-2 s). "
        f"Wall time of the whole `datamill.run` (planning, requests, parsing, tables), after an untimed "
        f"{WARM_UP}-request run on each executor (imports; Ray's workers loading the step's code). The same spec on "
        f"both, max_in_flight {loc['max_in_flight']}: it is the total on either executor, on Ray split between the "
        f"tasks running at once.",
        "",
        "| executor | requests in flight | seconds | vs local | shards | shard seconds (min-max; total) |",
        "|---|---|---|---|---|---|",
        f"| local (one client) | {loc['in_flight_at_once']} | {loc['seconds']:.2f} | 1.00x | - | - |",
        f"| ray ({cpus} tasks at a time x {ray['max_in_flight_per_task']}) | {ray['in_flight_at_once']} | "
        f"{ray['seconds']:.2f} | {ray['ray_over_local']:.2f}x | {ray['shards']} | "
        f"{s['min']:.2f}-{s['max']:.2f}; {s['total']:.1f} |",
        "",
        f"Tables identical to the local run's (polars `.equals`, {rows[GEN_STEP]:,} rows kept, "
        f"{rows[GEN_STEP + '__rejected']:,} rejected): ray {ident['ray']}, local repeats {ident['local_repeats']}. "
        f"Runs (s): local {loc['all_seconds']}, ray {ray['all_seconds']}. Ray's cost here: task start, a client per "
        f"shard, each shard's last requests draining, results sent back to the driver, which writes the request cache.",
        "",
        f"Expected time on N machines like this one. With the spec unchanged, the total in flight stays "
        f"{loc['max_in_flight']} (ceil({loc['max_in_flight']} / (N x {cpus})) per task), so generation stays bound by "
        f"max_in_flight / latency = {loc['max_in_flight'] / delay:.0f} requests/s: ~{first_fixed['seconds']} s on 1 "
        f"machine and still ~{last_fixed['seconds']} s on {max(NODES)} (last column). A user raises max_in_flight "
        f"with the cluster; the table is "
        f"for max_in_flight {loc['max_in_flight']} x N ({ray['max_in_flight_per_task']} per task, as measured here), "
        f"assuming the endpoint answers N times the requests at the same {delay} s latency. From the run's shard "
        f"timings: a shard of s requests with m out at once waits ceil(s / m) rounds of {delay} s, plus "
        f"{est['per_shard_seconds']:.2f} s of its own (measured: shard time beyond the rounds; client start, answers "
        f"parsed, results sent back); each CPU runs ~4 shards in turn (the step cuts ~4 slices per CPU of the cluster); "
        f"plus {est['driver_seconds']:.2f} s in the driver (planning, the request cache, the tables; measured as wall "
        f"minus total shard seconds / {cpus}). T(N) = ceil(shards / (N x {cpus})) x (ceil(s / m) x {delay} + "
        f"{est['per_shard_seconds']:.2f}) + {est['driver_seconds']:.2f}, m = ceil(max_in_flight / (N x {cpus})):",
        "",
        f"| machines | shards x requests | max_in_flight (per task) | requests in flight | endpoint must serve (requests/s) "
        f"| estimated seconds | same spec, max_in_flight {loc['max_in_flight']} |",
        "|---|---|---|---|---|---|---|",
        *[f"| {nodes} | {e['shards']} x {e['requests_per_shard']} | {e['max_in_flight']:,} ({e['max_in_flight_per_task']}) | "
          f"{e['in_flight']:,} | {e['endpoint_requests_per_s']:,} | {e['seconds']} | {node(fixed, nodes)['seconds']} |"
          for nodes, e in ((nodes, node(est, nodes)) for nodes in NODES)],
        "",
        f"What bounds generation is the endpoint, not our CPUs: a shard spends its time waiting for answers, so "
        f"machines help only with a larger max_in_flight and while the endpoint answers the extra requests as fast "
        f"(the table assumes the same {delay} s latency at {last['endpoint_requests_per_s']:,} requests/s on "
        f"{max(NODES)} machines), and once shards are smaller than the per-task share ({last['requests_per_shard']} "
        f"requests at {max(NODES)} machines) only the fixed costs are left: each CPU still runs ~4 shards in turn, each "
        f"at least one round, so T(N) >= ~4 x {delay} s + {est['driver_seconds']:.2f} s. A real server's throughput R "
        f"(its GPUs' batch capacity, or the provider's rate limit) puts a floor under any cluster: T >= {n:,} / R, e.g. "
        f"{n / 100:.0f} s at R = 100 requests/s, {n / 1000:.0f} s at R = 1,000, whatever N. Raising max_in_flight on "
        f"one machine reaches that ceiling without a cluster: Ray pays for generation when the client side is the "
        f"bottleneck (parsing, many endpoints), or to run it with other sharded steps on one cluster.",
        "",
        "Not measured: multi-node clusters (no second machine here); a real endpoint's latency spread (the fake one "
        "answers every request after the same delay, so shards finish evenly).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="ZIP-FIT: best of this many")
    parser.add_argument("--gen-repeats", type=int, default=2, help="generation: best of this many (a fresh workspace each)")
    parser.add_argument("--delay", type=float, default=0.5, help="the fake server's answer delay, seconds")
    parser.add_argument("--only", choices=["zipfit", "generation"], default=None,
                        help="run one half; the other half's results are kept from the existing JSON")
    args = parser.parse_args()
    n, n_targets = (10_000, 200) if args.quick else (50_000, 200)
    n_requests = 1_000 if args.quick else 5_000
    do_zipfit, do_gen = args.only in (None, "zipfit"), args.only in (None, "generation")
    cpus = os.cpu_count() or 1
    per_task = max(1, -(-MAX_IN_FLIGHT // cpus))  # on Ray, as GenerateStep._per_task splits it (1 CPU a task)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    load_before = os.getloadavg()[0]
    # local runs first, before Ray exists (a local user has no Ray processes around)
    zpart = zipfit_local(n, n_targets, args.repeats) if do_zipfit else None
    server = base_url = None
    if do_gen:
        server, base_url = start_fake_server(args.delay)
        generate_once(base_url, WARM_UP, "local", MAX_IN_FLIGHT)  # imports and first-call costs, not timed
        gen_loads = {"load_average_before": os.getloadavg()[0]}
        local = generate_best_of(base_url, n_requests, "local", MAX_IN_FLIGHT, args.gen_repeats)
    try:
        start = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ray_start_s = time.perf_counter() - start
        ray.get([ray.remote(lambda: None).remote() for _ in range(cpus)])  # workers up before timing
        zresult = zipfit_ray(zpart, args.repeats, cpus) if do_zipfit else None
        if do_gen:
            # the step's RayShards join this instance (ray.is_initialized()); a small run first, not
            # timed, so that the workers have imported the step's code, as the driver has
            generate_once(base_url, WARM_UP, "ray", MAX_IN_FLIGHT)
            gen_loads["load_average_before_ray"] = os.getloadavg()[0]
            ray_gen = generate_best_of(base_url, n_requests, "ray", MAX_IN_FLIGHT, args.gen_repeats)
            gen_loads["load_average_after"] = os.getloadavg()[0]
        ray.shutdown()
    finally:
        if server is not None:
            server.kill()
            server.wait()
    gen = generation_result(n_requests, args.delay, args.gen_repeats, cpus, gen_loads, local, ray_gen,
                            per_task) if do_gen else None

    machine = {"cpu": cpu_name(), "cores": cpus, "python": platform.python_version(),
               "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
               "ray_start_seconds": round(ray_start_s, 2)}
    old = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {}
    result = {"machine": {**old.get("machine", {}), **machine}}
    if zresult is not None:
        result.update(zresult)
        result["ray_start_seconds"] = machine["ray_start_seconds"]
    else:  # kept as measured (flat keys: the layout this JSON had before the generation half)
        result.update({key: value for key, value in old.items() if key not in ("machine", "generation")})
        for key in ("cpu", "load_average_before"):  # where and under what load they were measured
            result.setdefault(key, old.get("machine", {}).get(key))
    result["generation"] = gen if gen is not None else old.get("generation")
    print(json.dumps(result, indent=2))
    text = markdown(result, zipfit_rerun=zresult is not None)
    if args.quick:  # prints only
        print(text)
        return
    JSON_PATH.write_text(json.dumps(result, indent=2) + "\n")
    MD_PATH.write_text(text)

if __name__ == "__main__":
    main()
