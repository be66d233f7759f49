"""Client overhead of the `openai` generation backend against an instant local server.

A fake OpenAI-compatible server (tests/fake_openai_server.py, aiohttp) answers every chat
completion at once, in a process of its own so that its CPU use is not charged to a client.
For 64 and 256 requests in flight, 5,000 requests each, two clients are timed, each in a fresh
process (imports and setup not timed; a short warm-up first):
  peer      the `openai` SDK's AsyncOpenAI (max_retries=0, httpx connection limits = in-flight)
            driven by a pool of asyncio workers of the same concurrency;
  datamill  datagen.backends.openai_compat.OpenAIBackend, whose on_result appends each result
            to a shard with the generate step's own ShardStore (a flushed JSON line each).
Median of 3 runs each (clients interleaved). A third client, plain aiohttp posts with no
retries and no writes, is timed as a reference ceiling (not a peer). Goal from the datagen issue:
datamill >= 0.9x the bare client while also doing retries and shard writes.

Run:  .venv/bin/python bench/genclient.py      (writes bench/genclient.json and .md)
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

from machine import start_fake_server  # bench/machine.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
N_REQUESTS = 5000
IN_FLIGHT = (64, 256)
REPEATS = 3
MODEL = "fake-model"


def messages(i: int) -> list[dict]:
    """A GenQA-sized request: a system line and a generator prompt of a few hundred characters."""
    return [{"role": "system", "content": "You are a helpful assistant that writes exam questions."},
            {"role": "user", "content": f"Write a hard, self-contained question about topic #{i} in "
                                        "the style of a university exam, then answer it step by step. "
                                        "Start with 'Question:' and put the answer after 'Answer:'. " * 2}]


# ---- the two clients (each runs in its own process) ----

def run_peer(base_url: str, n: int, in_flight: int) -> float:
    import asyncio

    import httpx2 as httpx  # what openai 3.x is built on (plain `httpx` for openai 1.x)
    import openai

    async def main() -> float:
        limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
        client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120,
                                    http_client=httpx.AsyncClient(limits=limits, timeout=120))
        texts: list[str] = []

        async def pool(count: int) -> None:
            todo = iter(range(count))

            async def worker() -> None:
                for i in todo:
                    response = await client.chat.completions.create(
                        model=MODEL, messages=messages(i), temperature=0.7, top_p=0.95,
                        max_tokens=512, seed=i)
                    texts.append(response.choices[0].message.content)

            await asyncio.gather(*(worker() for _ in range(in_flight)))

        await pool(2 * in_flight)  # warm-up: connections opened, code paths hot
        start = time.perf_counter()
        await pool(n)
        elapsed = time.perf_counter() - start
        await client.close()
        assert len(texts) == 2 * in_flight + n
        return elapsed

    return asyncio.run(main())


def run_bare(base_url: str, n: int, in_flight: int) -> float:
    """Reference, not a goal: plain aiohttp posts with the same worker pool, no retries, no
    writes. The gap to datamill is what retries, result objects and shard writes cost."""
    import asyncio

    import aiohttp

    async def main() -> float:
        connector = aiohttp.TCPConnector(limit=in_flight)
        async with aiohttp.ClientSession(connector=connector) as session:
            texts: list[str] = []

            async def pool(count: int) -> None:
                todo = iter(range(count))

                async def worker() -> None:
                    for i in todo:
                        body = {"model": MODEL, "messages": messages(i), "temperature": 0.7,
                                "top_p": 0.95, "max_tokens": 512, "seed": i}
                        async with session.post(base_url + "/chat/completions", json=body) as response:
                            texts.append(json.loads(await response.read())["choices"][0]["message"]["content"])

                await asyncio.gather(*(worker() for _ in range(in_flight)))

            await pool(2 * in_flight)
            start = time.perf_counter()
            await pool(n)
            return time.perf_counter() - start

    return asyncio.run(main())


def run_datamill(base_url: str, n: int, in_flight: int) -> float:
    import types

    from datagen.backends.base import GenRequest
    from datagen.backends.openai_compat import OpenAIBackend

    config = types.SimpleNamespace(base_url=base_url, api_key_env=None, max_in_flight=in_flight,
                                   timeout_s=120.0, max_retries=6, backoff_s=1.0)
    backend = OpenAIBackend(config, MODEL)

    def requests(count: int, offset: int):
        for i in range(offset, offset + count):
            yield GenRequest(id=f"r{i}", messages=messages(i), temperature=0.7, top_p=0.95,
                             max_tokens=512, seed=i)

    from dataclasses import asdict

    from datagen.shards import ShardStore

    with tempfile.TemporaryDirectory() as tmp:
        # Exactly what the generate step does per result: one flushed JSON line in its shard
        # (ShardStore.append: json.dumps, write, flush, an fsync at most once a second).
        store = ShardStore(Path(tmp))

        def on_result(result) -> None:
            store.append(asdict(result))

        backend.generate(requests(2 * in_flight, n), on_result)  # warm-up
        start = time.perf_counter()
        backend.generate(requests(n, 0), on_result)
        elapsed = time.perf_counter() - start
        store.close()
    assert backend.stats.sent == 2 * in_flight + n and backend.stats.failed == 0
    return elapsed


# ---- orchestration ----



def measure(client: str, base_url: str, in_flight: int) -> float:
    """Requests per second of one client run, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--client", client, "--base-url", base_url,
                          "--in-flight", str(in_flight), "--n", str(N_REQUESTS)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise RuntimeError(f"{client} failed:\n{out.stderr}")
    return N_REQUESTS / float(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    from importlib.metadata import version

    return {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}",
            "aiohttp": version("aiohttp"), "openai": version("openai")}


def main() -> None:
    load_before = os.getloadavg()[0]
    server, base_url = start_fake_server()
    runs: dict[str, dict[str, list[float]]] = {}
    try:
        for in_flight in IN_FLIGHT:
            runs[str(in_flight)] = {"peer": [], "datamill": [], "bare_aiohttp": []}
            for _ in range(REPEATS):
                for client in ("peer", "datamill", "bare_aiohttp"):
                    runs[str(in_flight)][client].append(round(measure(client, base_url, in_flight), 1))
                    print(f"in-flight {in_flight} {client}: {runs[str(in_flight)][client][-1]} req/s", flush=True)
    finally:
        server.terminate()
        server.wait()

    results = []
    for in_flight, by_client in runs.items():
        peer, ours = statistics.median(by_client["peer"]), statistics.median(by_client["datamill"])
        bare = statistics.median(by_client["bare_aiohttp"])
        results.append({"in_flight": int(in_flight), "requests": N_REQUESTS, "peer_rps": peer,
                        "datamill_rps": ours, "ratio": round(ours / peer, 3), "bare_aiohttp_rps": bare,
                        "ratio_to_bare_aiohttp": round(ours / bare, 3), "runs": by_client})
    info = machine()
    # Other work on the machine shifts absolute figures between sessions; record how busy it was.
    info["load_average_1min"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    report = {"machine": info, "repeats": REPEATS, "results": results}
    (ROOT / "bench" / "genclient.json").write_text(json.dumps(report, indent=2) + "\n")

    lines = [f"# Generation client throughput ({info['platform']}, {info['nproc']} cores, {info['cpu']}, "
             f"Python {info['python']}; median of {REPEATS})", "",
             f"{N_REQUESTS:,} chat completions against a local OpenAI-compatible server that answers at once "
             "(tests/fake_openai_server.py, aiohttp, its own process). Peer: `openai.AsyncOpenAI` "
             f"{info['openai']} (max_retries=0, httpx limits = in-flight) driven by asyncio workers. "
             f"datamill: `OpenAIBackend` (aiohttp {info['aiohttp']}, retries on) appending each result to a "
             "shard with the generate step's `ShardStore` (a flushed JSON line each). Imports and a short "
             "warm-up are not timed; each run is a fresh process.", "",
             "| in flight | peer: AsyncOpenAI (requests/s) | datamill (requests/s) | datamill / peer "
             "| reference: bare aiohttp (requests/s) | datamill / bare aiohttp |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['in_flight']} | {r['peer_rps']:.0f} | {r['datamill_rps']:.0f} | {r['ratio']:.2f}x "
                     f"| {r['bare_aiohttp_rps']:.0f} | {r['ratio_to_bare_aiohttp']:.2f}x |")
    lines += ["", "Bare aiohttp: the same worker pool posting with aiohttp, no retries, no result objects, "
                  "no writes; it is the ceiling of any aiohttp-based client on this machine, not a peer.",
              "", "Runs (requests/s): " + "; ".join(
        f"{r['in_flight']} in flight: peer {r['runs']['peer']}, datamill {r['runs']['datamill']}, "
        f"bare aiohttp {r['runs']['bare_aiohttp']}" for r in results),
        "", f"Note: a {info['nproc']}-core machine. Server and client are separate processes but share "
            "these cores, so absolute figures are a lower bound; the ratios are the comparison that matters. "
            f"1-minute load average {info['load_average_1min']['before']} before, "
            f"{info['load_average_1min']['after']} after (other work on the machine moves absolute figures "
            "between sessions). Goal (datagen issue): datamill / peer >= 0.9x; the bare aiohttp column is "
            "a reference, not a goal."]
    (ROOT / "bench" / "genclient.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", choices=("peer", "datamill", "bare_aiohttp"))
    parser.add_argument("--base-url")
    parser.add_argument("--in-flight", type=int)
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    if args.client:
        run = {"peer": run_peer, "datamill": run_datamill, "bare_aiohttp": run_bare}[args.client]
        print(run(args.base_url, args.n, args.in_flight))
    else:
        main()
