"""Independent pieces of a step's work (shards), run where the spec's `executor:` says.

A shardable step splits its work into shards whose results do not depend on each other or on
where they ran (ZIP-FIT scores of a slice of the candidates, say), and hands a function and the
shards to `ctx.shards.map`. `local` runs them in this process, one after the other (a step may
still use threads or processes inside a shard); `ray` runs each as a Ray task, retried by Ray
when its worker dies. Results come back in shard order, so a step's output, and its cache key,
are the same whichever executor ran it. Per-shard timings go into the step's stats.

What a shard needs that is costly to build (a loaded model, a generation backend) comes as
`setup`, a dict of keyword name -> zero-argument factory (picklable: a `functools.partial` of a
module-level function): every shard runs as `fn(shard, **{name: factory() ...})`. Locally each
factory is called once per `map`, on the first shard, and its result reused by the others; on Ray,
once per task, inside it. With `on_emit`, a shard also gets `emit`, a callable of one value
(a finished request, a count of rows done): `on_emit(i, value)` runs here for each, at once
locally, as the shard's task returns on Ray. So a step calls `map` the same way on either
executor, and the fast (local) tests run the very function a Ray task runs. Threads a shard may
use: `cpus_per_shard`.

On Ray, the points of a sweep run at the same time, one thread each (datamill/points.py), but
only one step at a time does work in this process: it holds the executor's `work_lock`, and lets
go of it only while it waits for Ray (`released()`: in `map`, and around Ray Train). So what runs
here runs as in a sequential run (the global RNGs that a step seeds are its own), while the
points' Ray tasks overlap.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable

from datamill.errors import SpecError

RAY_EXTRA = "executor: ray needs Ray: pip install 'datamill[ray]'"


Setup = dict[str, Callable[[], Any]]


def _built(setup: Setup | None) -> dict:
    return {name: factory() for name, factory in (setup or {}).items()}


def _remote(fn: Callable, shard: Any, torch_threads: int | None, setup: Setup | None = None,
            emits: bool = False) -> tuple[Any, float, list]:
    """A shard in a Ray worker, with this process's torch thread count: torch's CPU kernels split
    their sums by thread, so the count decides the last bits of a result, and Ray starts a
    1-CPU task with one thread. (Set the executor's `num_cpus` to match, or Ray oversubscribes.)"""
    if torch_threads:
        if "torch" in sys.modules:  # a worker reused from an earlier task
            sys.modules["torch"].set_num_threads(torch_threads)
        else:  # read when the shard imports torch; importing it here would slow torch-free shards
            os.environ["OMP_NUM_THREADS"] = str(torch_threads)
    start = time.perf_counter()
    kwargs, emitted = _built(setup), []  # in the task: the setup is part of the shard's time, as locally
    if emits:
        kwargs["emit"] = emitted.append
    result = fn(shard, **kwargs)
    return result, time.perf_counter() - start, emitted


class LocalShards:
    kind = "local"
    workers = 1

    def __init__(self) -> None:
        self.seconds: list[float] = []

    @property
    def cpus_per_shard(self) -> int:
        """Threads a shard may use: every core here (shards run one after the other)."""
        return os.cpu_count() or 1

    def map(self, fn: Callable, shards: list, on_done: Callable[[int, Any], None] | None = None, *,
            setup: Setup | None = None, on_emit: Callable[[int, Any], None] | None = None) -> list:
        """fn(shard, **resources) for every shard; results in shard order. `setup`: the resources,
        {keyword: zero-argument factory}, built here once, on the first shard, for all of them
        (module docstring). `on_done(i, result)` runs here, in the calling process, as each shard
        finishes (e.g. to save its results at once); `on_emit(i, value)` as shard i emits a value
        (fn gets `emit=` then)."""
        results, resources = [], None
        for i, shard in enumerate(shards):
            start = time.perf_counter()
            if resources is None:
                resources = _built(setup)
            kwargs = {**resources, "emit": functools.partial(on_emit, i)} if on_emit else resources
            result = fn(shard, **kwargs)
            results.append(result)
            self.seconds.append(time.perf_counter() - start)
            if on_done:
                on_done(i, result)
        return results

    def released(self):
        """While Ray works for this step (nothing to release locally)."""
        return nullcontext()

    def slices(self, items: list, *, minimum: int = 1, align: int = 1) -> list[list]:
        """`items` cut into consecutive slices, about four per worker when there are several
        (stragglers even out; one worker runs them one after the other: one slice), each at least
        `minimum` long and a multiple of `align` (e.g. whole batches), in order."""
        pieces = 4 * self.workers if self.workers > 1 else 1
        size = max(minimum, -(-len(items) // pieces))
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
            self._ray = start_ray(self.address)
        return self._ray

    @property
    def workers(self) -> int:
        return max(1, int(self.ray.cluster_resources().get("CPU", 1) // self.num_cpus))

    @property
    def cpus_per_shard(self) -> int:
        """Threads a shard may use: the CPUs Ray gives its task."""
        return max(1, int(self.num_cpus))

    def map(self, fn: Callable, shards: list, on_done: Callable[[int, Any], None] | None = None, *,
            setup: Setup | None = None, on_emit: Callable[[int, Any], None] | None = None) -> list:
        """As `LocalShards.map`, each shard a Ray task that builds `setup` itself; its emitted
        values come back with its result."""
        task = self.ray.remote(_remote).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                                max_retries=self.max_retries)
        threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
        refs = [task.remote(fn, shard, threads, setup, on_emit is not None) for shard in shards]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        while pending:  # as they finish, so that on_done can save each shard's results at once
            with self.released():
                ready, pending = self.ray.wait(pending, num_returns=1)
            i = index[ready[0]]
            results[i], seconds, emitted = self.ray.get(ready[0])
            self.seconds.append(seconds)
            for value in emitted:
                on_emit(i, value)
            if on_done:
                on_done(i, results[i])
        return results


_ray_start_lock = threading.Lock()


def start_ray(address: str | None):
    """Ray, joined or started once per process. A local instance's services (GCS, raylet) are
    killed when the *thread* that started them ends (Ray sets Linux's PR_SET_PDEATHSIG, which is
    per thread), and a sweep point's thread ends with its point: so they are started from a
    daemon thread that lives as long as the process."""
    ray = import_ray()
    with _ray_start_lock:
        if ray.is_initialized():
            return ray
        started, failure = threading.Event(), []

        def keep_ray():
            try:
                # None: a local Ray instance on this machine; "auto" or ray://host:port: a running cluster
                ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            except BaseException as error:  # re-raised in the caller's thread
                failure.append(error)
                started.set()
                return
            started.set()
            threading.Event().wait()  # never set: this thread is the services' parent until exit

        threading.Thread(target=keep_ray, name="datamill-ray", daemon=True).start()
        started.wait()
        if failure:
            raise failure[0]
    return ray


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
