"""`datamill.tracker.Tracker` backed by MLflow.

Everything goes through one `MlflowClient` with explicit run ids: no global tracking URI, no
active-run stack, so several trackers (or a test) can share a process. Every string that
leaves for MLflow passes `datamill.secrets.scrub` even though callers already redact: a
secret read with `read_secret_env` must never reach the store.

mlflow is imported, and the client made, on first use: together they take seconds, which an
unchanged re-run does without (`find_runs` reads a sqlite store's tables directly).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import time
from pathlib import Path

from datamill.secrets import scrub
from datamill.tracker import StepRecord, TableRecord
from tracking.params import (
    MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH, flatten_params, is_housekeeping,
    sanitize_key, to_text, truncate, unique_keys, walk,
)

TRUNCATED_TAG = "datamill.truncated_params"
_MAX_DIGEST = 36  # mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE


class MlflowTracker:
    def __init__(self, uri: str, artifact_root: Path):
        self.uri = uri
        self.artifact_root = Path(artifact_root)
        self._client = None
        self._experiments: dict[str, str] = {}

    @property
    def client(self):
        if self._client is None:
            import mlflow

            # mlflow logs table creation/migration at INFO on first use of a store: noise for users
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            # A client's first use of a store (MlflowClient() itself, for sqlite) creates its
            # tables or migrates them. Two processes doing that to one new sqlite file at once
            # fail ("table experiments already exists"): it happens under a lock the other waits for.
            with _store_creation_lock(self.uri):
                client = mlflow.MlflowClient(tracking_uri=self.uri)
                client.search_experiments(max_results=1)  # the store, if the client was lazy
            self._client = client
        return self._client

    # --- runs ---
    def start_run(self, *, experiment: str, run_name: str, parent_run_id: str | None,
                  params: dict, tags: dict[str, str], spec_yaml: str) -> str:
        tags = dict(tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id  # what the UI uses to nest runs
        run = self.client.create_run(self._experiment_id(experiment), run_name=scrub(run_name),
                                     tags={k: _tag_value(v) for k, v in tags.items()})
        run_id = run.info.run_id
        # scrub before flattening: truncation could otherwise cut a secret in half
        flat, truncated = flatten_params(_scrub_tree(params))
        self._log_batch(run_id, params=flat)
        if truncated:
            self.client.set_tag(run_id, TRUNCATED_TAG, _tag_value(", ".join(truncated)))
        self.client.log_text(run_id, scrub(spec_yaml), "spec.yaml")
        return run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def location(self) -> str:
        return self.uri

    def close_stale_runs(self, experiment: str, workspace: str) -> int:
        database = _sqlite_path(self.uri)
        if database is not None:
            try:
                if not _find_in_sqlite(database, experiment, {"datamill.workspace": workspace}, status="RUNNING"):
                    return 0  # the usual case, known without starting MLflow
            except sqlite3.Error:
                pass
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return 0
        stale = self.client.search_runs(
            [found.experiment_id], max_results=1000,
            filter_string=f"attributes.status = 'RUNNING' and tags.`datamill.workspace` = {_quoted(workspace)}")
        for run in stale:
            self.client.set_tag(run.info.run_id, "datamill.closed_by", "the next run: this one was interrupted")
            self.client.set_terminated(run.info.run_id, status="KILLED")
        return len(stale)

    def find_runs(self, experiment: str, tags: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
        database = _sqlite_path(self.uri)
        if database is not None:
            try:
                return _find_in_sqlite(database, experiment, tags)
            except sqlite3.Error:
                pass  # tables this reading does not know (another MLflow version?): ask MLflow
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        wanted = " and ".join(f"tags.`{key}` = {_quoted(value)}" for key, value in tags.items())
        runs, token = [], None
        while True:  # search_runs answers in pages
            page = self.client.search_runs(
                [found.experiment_id], filter_string=f"attributes.status = 'FINISHED' and {wanted}",
                order_by=["attributes.start_time DESC"], max_results=1000, page_token=token)
            runs += [(run.info.run_id, dict(run.data.tags)) for run in page]
            token = page.token
            if not token:
                return runs

    @staticmethod
    def serve_ui(uri: str, artifact_root: Path, host: str = "127.0.0.1", port: int | None = None) -> None:
        """`datamill ui`: the MLflow UI for this store until Ctrl-C (`tracking.ui.serve`)."""
        from tracking.ui import serve

        serve(uri, artifact_root, host=host, port=port)

    # --- logging ---
    def log_step(self, run_id: str, step: StepRecord) -> None:
        """The step's results as metrics `<step>.<stat>`; how it went (row counts, seconds,
        sharding: `is_housekeeping`) as tags `step.<step>.<stat>`, beside its key and cache status.
        MLflow lists a run's metrics alphabetically and no character it allows in a key sorts
        after the letters, so no prefix could keep that bookkeeping below the results; as tags
        it leaves the metrics (and the charts) to the results."""
        if step.tables:
            self.client.log_inputs(run_id, datasets=[_dataset_input(t, step.name) for t in step.tables])
        metrics = {}
        tags = {f"step.{step.name}.key": step.key, f"step.{step.name}.cached": to_text(step.cached),
                f"step.{step.name}.seconds": to_text(round(step.seconds, 3))}
        if step.model_dir is not None:
            # only the path: models are large and already live in the workspace cache
            tags[f"step.{step.name}.model_path"] = str(step.model_dir)
        for key, value in walk(step.stats):
            if _is_number(value) and not is_housekeeping(key):
                metrics[f"{step.name}.{key}"] = value
            elif key:
                tags[f"step.{step.name}.{key}"] = to_text(value)
        for table in step.tables:  # after the stats: the row counts read from the files win
            side = "main" if table.name == step.name else table.name.removeprefix(f"{step.name}__")
            tags[f"step.{step.name}.rows.{side}"] = to_text(table.rows)
        self._log_batch(run_id, metrics=metrics, tags=tags)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        self._log_batch(run_id, metrics={k: v for k, v in metrics.items() if _is_number(v)}, step=step or 0)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_table(self, run_id: str, name: str, columns: dict[str, list]) -> None:
        # MLflow's table artifacts show in the run's "Evaluation"/artifact views; strings are scrubbed.
        clean = {k: [scrub(v) if isinstance(v, str) else v for v in values] for k, values in columns.items()}
        self.client.log_table(run_id, data=clean, artifact_file=f"tables/{sanitize_key(name)}.json")

    # --- helpers ---
    def _experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            self._experiments[name] = self._get_or_create_experiment(name)
        return self._experiments[name]

    def _get_or_create_experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            # "finetuning": MLflow 3's UI then opens on training runs, not its GenAI trace views
            return self.client.create_experiment(name, artifact_location=self._artifact_location(name),
                                                 tags={"mlflow.experimentKind": "finetuning"})
        except MlflowException:
            found = self.client.get_experiment_by_name(name)  # created concurrently by another process
            if found is None:
                raise
            return found.experiment_id

    def _artifact_location(self, experiment: str) -> str | None:
        # A tracking server decides where artifacts go. A local store (sqlite) would otherwise
        # put them in ./mlruns of whatever directory the process happens to run in.
        if self.uri.startswith(("http://", "https://")):
            return None
        folder = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment).lstrip(".") or "default"
        return (self.artifact_root / folder).resolve().as_uri()

    def _log_batch(self, run_id: str, metrics: dict | None = None, step: int = 0, params: dict | None = None,
                   tags: dict | None = None) -> None:
        """log_batch within MLflow's per-request limits (100 params/tags, 1000 metrics). Metric and
        tag keys are made valid here, apart from each other when two become the same; `params`
        come flattened (flatten_params already did that)."""
        from mlflow.entities import Metric, Param, RunTag

        metrics, params, tags = metrics or {}, params or {}, tags or {}
        now = _now_ms()
        metrics = [Metric(k, float(v), now, step) for k, v in zip(unique_keys(list(metrics)), metrics.values())]
        params = [Param(k, v) for k, v in params.items()]
        tags = [RunTag(k, _tag_value(v)) for k, v in zip(unique_keys(list(tags)), tags.values())]
        while metrics or params or tags:
            self.client.log_batch(run_id, metrics=metrics[:MAX_METRICS_PER_BATCH],
                                  params=params[:MAX_PARAMS_TAGS_PER_BATCH], tags=tags[:MAX_PARAMS_TAGS_PER_BATCH])
            metrics = metrics[MAX_METRICS_PER_BATCH:]
            params = params[MAX_PARAMS_TAGS_PER_BATCH:]
            tags = tags[MAX_PARAMS_TAGS_PER_BATCH:]


def _dataset_input(table: TableRecord, step_name: str):
    """Describe a table by path, digest and schema: MLflow never reads the rows (slow on big tables)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    dataset = MetaDataset(source=_local_source(Path(table.path).resolve().as_uri()), name=table.name,
                          digest=table.digest[:_MAX_DIGEST], schema=_mlflow_schema(table.schema))
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", step_name)])


def _local_source(uri: str):
    # MLflow generates LocalArtifactDatasetSource at import time (one class per artifact scheme)
    # and registers it twice ("" and "file"), so resolve_dataset_source() warns; pick it by name.
    from mlflow.data.dataset_source_registry import get_registered_sources

    cls = next(s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource")
    return cls(uri)


def _mlflow_schema(columns: dict[str, str]):
    from mlflow.types import ColSpec, Schema

    return Schema([ColSpec(type=_mlflow_type(t), name=name) for name, t in columns.items()])


_ARROW_TO_MLFLOW = [  # (pattern on the Arrow type text, mlflow DataType name); first match wins
    (r"(int8|int16|int32|uint8|uint16)", "integer"),
    (r"(int64|uint32|uint64)", "long"),
    (r"(halffloat|float16|float|float32)", "float"),
    (r"(double|float64|decimal.*)", "double"),
    (r"bool", "boolean"),
    (r"(large_)?(string|utf8)|string_view", "string"),
    (r"(large_)?binary|binary_view|fixed_size_binary.*", "binary"),
    (r"(timestamp|date32|date64).*", "datetime"),
]


def _mlflow_type(arrow_type: str):
    from mlflow.types import DataType

    for pattern, name in _ARROW_TO_MLFLOW:
        if re.fullmatch(pattern, arrow_type.strip()):
            return DataType[name]
    return DataType.string  # lists, structs, dictionaries...: shown as text in the UI


def _sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///<path>` store (a relative path: from the current directory, as
    SQLAlchemy reads it), or None for other stores and in-memory sqlite."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


@contextlib.contextmanager
def _store_creation_lock(uri: str):
    """An exclusive lock on `<sqlite file>.lock` beside a sqlite store (other stores: none)."""
    database = _sqlite_path(uri)
    if database is None:
        yield
        return
    import fcntl

    database.parent.mkdir(parents=True, exist_ok=True)  # sqlite makes the file, not its folder
    with open(f"{database}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _find_in_sqlite(database: Path, experiment: str, tags: dict[str, str],
                    status: str = "FINISHED") -> list[tuple[str, dict[str, str]]]:
    """MlflowTracker.find_runs (runs in `status`) read straight from a sqlite store's tables
    (experiments, runs, tags; unchanged across MLflow versions for years), read-only: a query,
    where importing mlflow and opening the store through it take seconds. Raises sqlite3.Error
    on tables it does not know."""
    if not database.exists():
        return []  # nothing logged yet; and a read-only connection must not create the file
    with contextlib.closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as con:
        wanted = " ".join(
            "AND EXISTS (SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = ? AND t.value = ?)" for _ in tags)
        ids = [row[0] for row in con.execute(
            "SELECT r.run_uuid FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id "
            f"WHERE e.name = ? AND r.status = ? AND r.lifecycle_stage = 'active' {wanted} "
            "ORDER BY r.start_time DESC", [experiment, status, *(x for item in tags.items() for x in item)])]
        return [(run_id, dict(con.execute("SELECT key, value FROM tags WHERE run_uuid = ?", [run_id]).fetchall()))
                for run_id in ids]


def _quoted(value: str) -> str:
    """A string literal for an MLflow search filter."""
    return "'" + value.replace("'", "\\'") + "'"


def _scrub_tree(obj):
    if isinstance(obj, dict):
        return {scrub(str(k)): _scrub_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_scrub_tree(v) for v in obj]
    return scrub(obj) if isinstance(obj, str) else obj


def _tag_value(value) -> str:
    return truncate(scrub(to_text(value)), MAX_TAG_VAL_LENGTH)


def _is_number(value) -> bool:
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # bool is an int to Python


def _now_ms() -> int:
    return int(time.time() * 1000)
