"""A Ray executor's sweep: its points run at the same time, one thread each, so that their Ray
tasks (evaluation tasks, scoring slices, generation requests, training workers) overlap.

Each point runs as it would alone (the executor's `_run_point`, handed in as `run_point`: this
module imports nothing of the executor). What the points share is `Together`; their tracker
calls go one at a time (`tracker.Serialized`: a sqlite store has one writer).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable

from datamill import progress
from datamill.tracker import Serialized


class Together:
    """What the points of a sweep that run at once share: one step at a time works in this
    process (`work`, let go while a step waits for Ray: datamill/shards.py), and a step key is
    run by one point while the others wait for it, then find it cached."""

    def __init__(self):
        self.work = threading.Lock()
        self._keys: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @contextmanager
    def step(self, key: str):
        with self._guard:
            key_lock = self._keys.setdefault(key, threading.Lock())
        with key_lock, self.work:  # always in this order: no two threads wait on each other
            yield


def run_points_at_once(plans: list, tracker, run_point: Callable, register: Callable) -> list:
    """Every point in a thread of its own: `run_point(plan, tracker, together)` runs one and returns
    its result. Once every point has stopped, `register(plan)` is called here for each point that
    finished, then the first failure (in point order) is raised; else the results, in point order."""
    together, tracker = Together(), Serialized(tracker)
    points: list = [None] * len(plans)
    errors: list[BaseException | None] = [None] * len(plans)

    def run(i: int) -> None:
        try:
            points[i] = run_point(plans[i], tracker, together)
        except BaseException as e:  # re-raised below, in the main thread
            errors[i] = e

    # daemon: a Ctrl-C ends the process without waiting for them (the next run resumes)
    threads = [threading.Thread(target=run, args=(i,), name=f"point-{i}", daemon=True) for i in range(len(plans))]
    with progress.plain_bars():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for plan, point in zip(plans, points):
        if point is not None:
            register(plan)
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        raise failed
    return points
