"""What the executor tells an experiment tracker. `tracking/` implements it with MLflow;
core never imports mlflow (nor `tracking`: it finds the tracker class through the registry).
`NullTracker` is used when `tracking.enabled: false`; `Serialized` wraps a tracker that several
threads share."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass
class TableRecord:
    """One output table of a step, described without its rows."""

    name: str  # catalog name, e.g. "clean" or "clean__removed"
    path: Path  # parquet file
    rows: int
    digest: str  # content hash of the parquet file
    schema: dict[str, str]  # column -> type (Arrow type as text)


@dataclass
class StepRecord:
    """What happened to one step in a run."""

    name: str
    kind: str
    key: str
    cached: bool
    seconds: float
    stats: dict
    tables: list[TableRecord] = field(default_factory=list)
    model_dir: Path | None = None


class Tracker(Protocol):
    def start_run(self, *, experiment: str, run_name: str, parent_run_id: str | None,
                  params: dict, tags: dict[str, str], spec_yaml: str) -> str:
        """Open a run; `params` is the (already redacted) resolved spec as nested dicts plus
        the sweep point's values; `spec_yaml` is the redacted resolved spec. Returns its id."""

    def log_step(self, run_id: str, step: StepRecord) -> None:
        """Log a step's tables as dataset inputs, its stats as metrics/tags."""

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None: ...

    def log_table(self, run_id: str, name: str, columns: dict[str, list]) -> None:
        """A small table (e.g. 50 sample rows) viewable in the MLflow UI."""

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """status: FINISHED or FAILED."""

    def location(self) -> str:
        """Where results can be browsed (tracking URI), for the final message."""

    def close_stale_runs(self, experiment: str, workspace: str) -> int:
        """Mark KILLED the runs of `experiment` still RUNNING for `workspace` (left by a run that
        was killed: only one run holds a workspace at a time); return how many."""

    def find_runs(self, experiment: str, tags: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
        """(run id, its tags) of each FINISHED, not deleted run of `experiment` carrying all of
        `tags`, newest first: how a re-run finds the runs that already hold its results."""

    @staticmethod
    def serve_ui(uri: str, artifact_root: Path, host: str = "127.0.0.1", port: int | None = None) -> None:
        """`datamill ui`: serve a browser UI for the store at `uri` until Ctrl-C (port None: a free one)."""


class NullTracker:
    """Tracking disabled: every call is a no-op; run ids are empty strings."""

    def start_run(self, **kwargs) -> str:
        return ""

    def log_step(self, run_id, step) -> None:
        pass

    def log_metrics(self, run_id, metrics, step=None) -> None:
        pass

    def log_artifact(self, run_id, path, artifact_path=None) -> None:
        pass

    def log_table(self, run_id, name, columns) -> None:
        pass

    def end_run(self, run_id, status="FINISHED") -> None:
        pass

    def location(self) -> str:
        return "(tracking disabled)"

    def close_stale_runs(self, experiment, workspace) -> int:
        return 0

    def find_runs(self, experiment, tags) -> list:
        return []


class Serialized:
    """A tracker whose calls from several threads go one at a time (a sqlite store has one writer)."""

    def __init__(self, tracker):
        self._tracker, self._lock = tracker, threading.Lock()

    def __getattr__(self, name):
        attr = getattr(self._tracker, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)
        return call
