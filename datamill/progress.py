"""Progress reporting for every loop that may take more than a second.

On a terminal: a rich progress bar with rate and ETA. Not a terminal (CI logs, pipes):
a plain line every 10 seconds and one at the end. `--quiet`: nothing.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

_quiet = False
_plain = False  # log lines instead of live bars, even on a terminal


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def console():
    from rich.console import Console

    # soft_wrap: a message is never broken at the terminal's width (80 columns in a CI log), so
    # the paths and commands it prints can be copied whole; tables still fit the width
    return Console(stderr=True, quiet=_quiet, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """A warning on stderr, shown under `--quiet` too (quiet silences progress, not problems)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[yellow]{escape(message)}[/yellow]")


class _PlainBar:
    """Progress as occasional log lines, for non-interactive output."""

    def __init__(self, desc: str, total: int | None, unit: str, every_s: float = 10.0):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.done = 0
        self.shown = -1  # `done` at the last line printed
        self.start = self.last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        self.shown = self.done
        rate = self.done / max(now - self.start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        print(f"  {self.desc}: {self.done}{of} {self.unit} ({rate:.1f} {self.unit}/s)", file=sys.stderr)

    def set_total(self, total: int) -> None:
        self.total = total

    def close(self) -> None:
        if time.monotonic() - self.start >= 1.0 and self.done != self.shown:  # not the same line twice
            self._line(time.monotonic())


class _RichBar:
    def __init__(self, desc: str, total: int | None, unit: str):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(
            TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console(), transient=False,
        )
        self.unit = unit
        self.start = time.monotonic()
        self.task = self.progress.add_task(desc, total=total, rate="")
        self.progress.start()

    @property
    def done(self) -> float:
        return self.progress.tasks[0].completed

    def advance(self, n: int = 1) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.progress.update(self.task, advance=n, rate=f"{(self.done + n) / elapsed:.1f} {self.unit}/s")

    def set_total(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def close(self) -> None:
        self.progress.stop()


class _NullBar:
    done = 0

    def advance(self, n: int = 1) -> None:
        self.done += n

    def set_total(self, total: int) -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def bar(desc: str, total: int | None = None, unit: str = "rows"):
    """`with bar("dedup", total=n) as b: ... b.advance()`; `b.done` so far; `b.set_total(n)` when
    the total is learnt late."""
    if _quiet:
        b = _NullBar()
    elif sys.stderr.isatty() and not _plain:
        b = _RichBar(desc, total, unit)
    else:
        b = _PlainBar(desc, total, unit)
    try:
        yield b
    finally:
        b.close()


@contextmanager
def plain_bars():
    """Progress as log lines while it lasts: for sweep points that run at once, whose live bars
    would draw over each other."""
    global _plain
    before, _plain = _plain, True
    try:
        yield
    finally:
        _plain = before


def track(iterable, desc: str, total: int | None = None, unit: str = "rows"):
    """Iterate with a progress bar."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with bar(desc, total, unit) as b:
        for item in iterable:
            yield item
            b.advance()


@contextmanager
def no_hf_loading_bars():
    """transformers prints a "Loading weights" bar per model load: noise next to our own bars
    (loads take a second). Restored afterwards, so a notebook user's setting stays theirs."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
