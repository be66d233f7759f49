"""Independent pieces of a step's work (shards), run where the spec's `executor:` says.

A shardable step splits its work into shards whose results do not depend on each other or on
where they ran (ZIP-FIT scores of a slice of the candidates, say), and hands a function and the
shards to `ctx.shards.map`. `local` runs them in this process, one after the other (a step may
still use threads or processes inside a shard); `ray` runs each as a Ray task, retried by Ray
when its worker dies. Results come back in shard order, so a step's output, and its cache key,
are the same whichever executor ran it. Per-shard timings go into the step's stats.

On Ray, the points of a sweep run at the same time, one thread each (datamill/points.py), but
only one step at a time does work in this process: it holds the executor's `work_lock`, and lets
go of it only while it waits for Ray (`released()`: in `map`, and around Ray Train). So what runs
here runs as in a sequential run (the global RNGs that a step seeds are its own), while the
points' Ray tasks overlap.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable

from datamill.errors import SpecError

RAY_EXTRA = "executor: ray needs Ray: pip install 'datamill[ray]'"


def _timed(fn: Callable, shard: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(shard)
    return result, time.perf_counter() - start


def _remote(fn: Callable, shard: Any, torch_threads: int | None) -> tuple[Any, float]:
    """A shard in a Ray worker, with this process's torch thread count: torch's CPU kernels split
    their sums by thread, so the count decides the last bits of a result, and Ray starts a
    1-CPU task with one thread. (Set the executor's `num_cpus` to match, or Ray oversubscribes.)"""
    if torch_threads:
        if "torch" in sys.modules:  # a worker reused from an earlier task
            sys.modules["torch"].set_num_threads(torch_threads)
        else:  # read when the shard imports torch; importing it here would slow torch-free shards
            os.environ["OMP_NUM_THREADS"] = str(torch_threads)
    return _timed(fn, shard)


class LocalShards:
    kind = "local"
    workers = 1

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def map(self, fn: Callable, shards: list, on_done: Callable[[int, Any], None] | None = None) -> list:
        """fn(shard) for every shard; results in shard order. `on_done(i, result)` runs here, in
        the calling process, as each shard finishes (e.g. to save its results at once)."""
        results = []
        for i, shard in enumerate(shards):
            result, seconds = _timed(fn, shard)
            results.append(result)
            self.seconds.append(seconds)
            if on_done:
                on_done(i, result)
        return results

    def released(self):
        """While Ray works for this step (nothing to release locally)."""
        return nullcontext()

    def slices(self, items: list, *, minimum: int = 1, align: int = 1) -> list[list]:
        """`items` cut into consecutive slices, about four per worker (stragglers even out), each
        at least `minimum` long and a multiple of `align` (e.g. whole batches), in order."""
        size = max(minimum, -(-len(items) // (4 * self.workers)))
        size = -(-size // align) * align
        return [items[i:i + size] for i in range(0, len(items), size)]

    def summary(self) -> dict:
        """For the step's stats (and so MLflow): the executor, shards run, their timing."""
        if not self.seconds:
            return {"executor": self.kind}
        return {"executor": self.kind, "shards": len(self.seconds),
                "shard_seconds": {"min": round(min(self.seconds), 3), "median": round(statistics.median(self.seconds), 3),
                                  "max": round(max(self.seconds), 3), "total": round(sum(self.seconds), 3)}}


class RayShards(LocalShards):
    """Each shard a Ray task (`num_cpus`/`num_gpus` each, `max_retries` on a dead worker)."""

    kind = "ray"

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 3,
                 work_lock: threading.Lock | None = None):
        super().__init__()
        self.address, self.num_cpus, self.num_gpus, self.max_retries = address, num_cpus, num_gpus, max_retries
        self.work_lock = work_lock  # held by this step's thread when sweep points run at once
        self._ray = None

    @contextmanager
    def released(self):
        """Lets another point's step use this process while this one waits for Ray."""
        if self.work_lock is None:
            yield
            return
        self.work_lock.release()
        try:
            yield
        finally:
            self.work_lock.acquire()

    @property
    def ray(self):
        """Ray, started (or joined) when a step first shards work: steps that do not never wait for it."""
        if self._ray is None:
            ray = import_ray()
            if not ray.is_initialized():
                # None: a local Ray instance on this machine; "auto" or ray://host:port: a running cluster
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            self._ray = ray
        return self._ray

    @property
    def workers(self) -> int:
        return max(1, int(self.ray.cluster_resources().get("CPU", 1) // self.num_cpus))

    def map(self, fn: Callable, shards: list, on_done: Callable[[int, Any], None] | None = None) -> list:
        task = self.ray.remote(_remote).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                                max_retries=self.max_retries)
        threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
        refs = [task.remote(fn, shard, threads) for shard in shards]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        while pending:  # as they finish, so that on_done can save each shard's results at once
            with self.released():
                ready, pending = self.ray.wait(pending, num_returns=1)
            i = index[ready[0]]
            results[i], seconds = self.ray.get(ready[0])
            self.seconds.append(seconds)
            if on_done:
                on_done(i, results[i])
        return results


def import_ray():
    try:
        import ray
    except ImportError:
        raise SpecError(RAY_EXTRA) from None
    return ray


def make_shards(config, work_lock: threading.Lock | None = None) -> LocalShards:
    """The spec's `executor:` as a shard runner (one per step, for its own timings)."""
    if config.kind == "ray":
        return RayShards(config.address, config.num_cpus, config.num_gpus, config.max_retries, work_lock)
    return LocalShards()
