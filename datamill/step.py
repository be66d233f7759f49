"""The step interface: what a step kind declares and what it gets when it runs.

A step kind is a small class (after datatrove's PipelineStep): a pydantic `Config`, the
tables/models/files it reads, and one `run(ctx)`. Core steps live in `datamill/steps/`;
stage packages register theirs through the `datamill.steps` entry-point group
(see `datamill/registry.py`; a recipe with a tested example: docs/EXTENDING.md). Heavy imports
(torch, transformers) belong inside `run`, never at module import: the spec is validated and
planned without them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator


class StepConfig(BaseModel):
    """Base for step configs: unknown keys are errors, and an optional shorthand lets a
    plain scalar stand for one field (`sql: "SELECT ..."` means `sql: {query: "SELECT ..."}`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    __shorthand__: ClassVar[str | None] = None

    @model_validator(mode="before")
    @classmethod
    def _expand_shorthand(cls, data):
        if cls.__shorthand__ and not isinstance(data, dict):
            return {cls.__shorthand__: data}
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        schema = handler(core_schema)
        if cls.__shorthand__:
            full = handler.resolve_ref_schema(schema)
            short = dict(full.get("properties", {}).get(cls.__shorthand__, {}))
            short.pop("default", None)
            obj = {k: v for k, v in full.items() if k not in ("description",)}
            desc = full.get("description")
            full.clear()
            full["anyOf"] = [short, obj]
            if desc:
                full["description"] = desc
        return schema


def optional_section(value):
    """For `field_validator(..., mode="before")` on an optional sub-config: `x: true` means the
    section with its defaults, `x: false` means none."""
    if value is True:
        return {}
    if value is False:
        return None
    return value


@dataclass
class Env:
    """What a step may consult while being checked and keyed (no heavy imports, no I/O beyond stat/hash)."""

    base_dir: Path  # folder of the spec file: relative paths resolve here
    code_dirs: tuple[Path, ...] = ()  # the spec's `code:` folders (resolved): where its own Python may be
    # Every eval task the spec's steps evaluate on (Step.eval_tasks), with the task folders they
    # name: what a `decontaminate` step without `tasks` cleans against.
    eval_tasks: dict[str, tuple[Path, ...]] = field(default_factory=dict)


class Step:
    """One step kind. Subclasses set `kind`, `Config`, `version` and implement `run`."""

    kind: ClassVar[str]
    Config: ClassVar[type[StepConfig]]
    version: ClassVar[str] = "1"  # bump when the output for the same config changes
    produces_model: ClassVar[bool] = False  # its output folder holds an HF model under model/
    side_tables: ClassVar[tuple[str, ...]] = ()  # tables besides the main one, read as `<step>__<side>`
    source_generator: ClassVar[bool] = False  # makes a table from nothing: usable as `sources: {x: {generator: kind}}`
    # columns of this step's tables that hold another table's row id: lineage follows them
    row_reference_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, config: StepConfig):
        self.name = name
        self.config = config

    # --- what the step reads (used for validation, the DAG and the cache key) ---
    def input_tables(self) -> list[tuple[tuple, str]]:
        """(field path within the config, table name) for every table this step reads."""
        return []

    def model_refs(self) -> list[tuple[tuple, str]]:
        """(field path, model reference or name) for every model this step uses."""
        return []

    def eval_tasks(self, env: Env) -> dict[str, tuple[Path, ...]]:
        """The eval tasks this step measures a model on, each with the task folders (absolute)
        that define it beyond the shipped ones: {"datamill_capitals_exact": ()}."""
        return {}

    def cleans_against(self, env: Env) -> set[str]:
        """The eval tasks this step's output is clean of (a `decontaminate` step's tasks): the
        contamination warning stops looking upstream of it."""
        return set()

    def check(self, env: Env) -> None:
        """Extra validation beyond the pydantic model; raise `FieldError(field, message)`."""

    execution_only: tuple[str, ...] = ()
    """Config fields that change how the work runs but not what it produces (device, logging
    cadence): left out of the cache key."""

    def key_config(self) -> dict:
        """The config as it enters the cache key: without `execution_only` fields. Override for
        finer cuts (fields inside nested sections)."""
        config = self.config.model_dump(mode="json")
        for name in self.execution_only:
            config.pop(name)
        return config

    def key_material(self, env: Env) -> dict:
        """Anything beyond config and inputs that decides the output (e.g. a file's hash)."""
        return {}

    def run(self, ctx: "StepContext") -> None:
        raise NotImplementedError

    def comparison_metrics(self, stats: dict) -> dict[str, float]:
        """The few numbers of a finished run (from its `stats`) that a sweep compares across its
        points, e.g. {"datamill_capitals_mc.acc": 0.64}: a table and a heatmap on the parent run."""
        return {}

    def comparison_examples(self, out_dir: Path) -> dict[str, Any]:
        """The per-example values behind some of `comparison_metrics`, read from the finished
        step's folder: {metric: datamill.comparison.ExampleScores}. With them a compared number
        gets a bootstrap interval, and two points scored on the same examples a paired test."""
        return {}


@dataclass
class StepContext:
    """Everything a running step needs. Outputs go to `out_dir` (a temp folder renamed into
    the cache when the step succeeds); `state_dir` survives an interrupted attempt so long
    steps can resume."""

    name: str
    kind: str
    key: str
    out_dir: Path
    state_dir: Path
    shared_dir: Path  # workspace-wide, survives across keys: e.g. a request cache reused when `n` grows
    env: Env
    input_paths: dict[str, Path]  # table name -> parquet file
    model_paths: dict[str, Any]  # model reference -> callable returning an HF folder Path
    tracker_log: Any = None  # callable(metrics: dict, step: int | None)
    tracker_table: Any = None  # callable(name: str, columns: dict[str, list])
    tracker_artifact: Any = None  # callable(path: Path, artifact_path: str | None)
    training_data: dict[str, list[Path]] = field(default_factory=dict)  # model reference -> parquet files it
    # was trained on (known from the plan: the inputs of the steps that made it), for its evaluation
    stats: dict = field(default_factory=dict)  # counts etc.; saved in meta.json and logged
    shards: Any = None  # datamill.shards runner of the spec's executor (LocalShards when None)

    def __post_init__(self):
        if self.shards is None:
            from datamill.shards import LocalShards

            self.shards = LocalShards()

    # --- inputs ---
    def read(self, table: str):
        """An input table as a Polars DataFrame."""
        import polars as pl

        return pl.read_parquet(self.input_paths[table])

    def read_batches(self, table: str, columns: list[str] | None = None, rows: int | None = None):
        """An input table as Polars DataFrames of about `rows` rows each, in order: for steps that
        stream, so that memory holds one batch, not the table."""
        return parquet_batches(self.input_paths[table], columns, rows)

    def input_rows(self, table: str) -> int:
        """The number of rows of an input table (from the Parquet footer; nothing is read)."""
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.input_paths[table]).metadata.num_rows

    def input_path(self, table: str) -> Path:
        return self.input_paths[table]

    def model_path(self, ref: str) -> Path:
        """Resolve a model reference (as written in the config) to a local HF folder."""
        return self.model_paths[ref]()

    # --- outputs ---
    def table_path(self, table: str = "main") -> Path:
        path = self.out_dir / "tables" / f"{table}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write(self, df, table: str = "main") -> None:
        """Write a Polars DataFrame as this step's main table or a named side table
        (`rejected`, `removed`, `scores`, ...), which appears in the catalog as `<step>__<table>`."""
        df.write_parquet(self.table_path(table))
        self.stats.setdefault("rows", {})[table] = df.height

    def writer(self, table: str = "main") -> "TableWriter":
        """Write a table in parts, for steps that stream: `with ctx.writer() as out: out.write(df)`
        for each batch. The parts become one Parquet file when the block ends (columns a part
        lacks are null; types widen as `pl.concat(how="diagonal_relaxed")` does)."""
        return TableWriter(self.table_path(table), on_close=lambda rows: self.stats.setdefault(
            "rows", {}).__setitem__(table, rows))

    def reject(self, df) -> None:
        """Write rows that failed parsing/validation; `df` must have a `reason` column."""
        if "reason" not in df.columns:
            raise ValueError("rejected rows need a 'reason' column")
        self.write(df, "rejected")

    @property
    def model_dir(self) -> Path:
        """Where a step that produces a model saves it (HF `save_pretrained` folder)."""
        return self.out_dir / "model"

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.tracker_log is not None:
            self.tracker_log({f"{self.name}.{k}": v for k, v in metrics.items()}, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file (a plot) or a folder to the run, under `<step name>/` unless `artifact_path`."""
        if self.tracker_artifact is not None:
            self.tracker_artifact(Path(path), artifact_path or self.name)

    def log_sample(self, df, name: str = "sample", rows: int = 50) -> None:
        """Log the first `rows` rows of a Polars DataFrame as an MLflow table (nested values as JSON text)."""
        if self.tracker_table is None:
            return
        import json

        head = df.head(rows)
        columns = {c: [v if isinstance(v, (str, int, float, bool, type(None))) else json.dumps(v, default=str)
                       for v in head[c].to_list()] for c in head.columns}
        self.tracker_table(f"{self.name}.{name}", columns)


BATCH_ROWS = 65_536  # rows per streamed batch: ~35 MB of 520-character instruction rows


def parquet_batches(path: Path, columns: list[str] | None = None, rows: int | None = None):
    """A Parquet file as Polars DataFrames of about `rows` rows each, in order. A table of no rows
    is one empty frame with its columns, so a streaming step still writes a table with them."""
    import polars as pl
    import pyarrow.parquet as pq

    empty = True
    # pre_buffer off: with it, pyarrow keeps the buffers of the row groups read so far (a 1M-row
    # table's memory grew 83 -> 315 MB over one pass; without it stays at ~71 MB)
    for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=rows or BATCH_ROWS, columns=columns):
        empty = False
        yield pl.from_arrow(batch)
    if empty:
        yield pl.read_parquet(path, columns=columns, n_rows=0)


class TableWriter:
    """A table written batch by batch. Batches of one schema are appended to one Parquet file as
    they come (row groups); when a batch's columns differ (an extra column appears, a type
    widens), the file so far and each later batch become parts that closing joins with Polars'
    streaming sink, as `pl.concat(how="diagonal_relaxed")` would. The file is written under a
    temp name and renamed on close; an exception inside the `with` block leaves nothing."""

    def __init__(self, path: Path, on_close=None):
        self.path = Path(path)
        self.parts_dir = self.path.with_name(f".{self.path.stem}.parts")
        self.parts: list[Path] = []  # set once batches differ; the first part is the file so far
        self.rows = 0
        self._on_close = on_close
        self._file = self.path.with_name(f".{self.path.stem}.writing.parquet")
        self._writer = None  # pyarrow's ParquetWriter while every batch has the first one's schema
        self._batches = 0

    def write(self, df) -> None:
        if df.height == 0 and self._batches:
            return  # an empty batch adds nothing; the first one still gives the table its columns
        table = df.to_arrow()
        self._batches += 1
        self.rows += df.height
        if self._batches == 1:
            import pyarrow.parquet as pq

            self._writer = pq.ParquetWriter(self._file, table.schema, compression="zstd")
        if self._writer is not None and table.schema.equals(self._writer.schema):
            self._writer.write_table(table)
            return
        if self._writer is not None:  # the schema changed: from here on, parts
            self._writer.close()
            self._writer = None
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            self.parts.append(self._file.replace(self.parts_dir / "part-000000.parquet"))
        part = self.parts_dir / f"part-{len(self.parts):06d}.parquet"
        df.write_parquet(part)
        self.parts.append(part)

    def close(self) -> None:
        import polars as pl

        from datamill.atomic import write_atomic

        if not self._batches:
            raise ValueError(f"no batch was written to {self.path.name}: write at least one (it may be empty)")
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._file.replace(self.path)
        else:
            frames = [pl.scan_parquet(part) for part in self.parts]
            write_atomic(self.path, lambda tmp: pl.concat(frames, how="diagonal_relaxed").sink_parquet(tmp))
            self._discard()
        if self._on_close is not None:
            self._on_close(self.rows)

    def _discard(self) -> None:
        import shutil

        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._file.unlink(missing_ok=True)
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def __enter__(self) -> "TableWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()


def write_json_atomic(path: Path, obj) -> None:
    from datamill.atomic import write_atomic

    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))
