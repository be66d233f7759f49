"""The workspace: the content-addressed step cache and the DuckDB catalog over it.

Layout (workspace = `.datamill/<spec name>` next to the spec unless `workspace:` says otherwise):

    <workspace>/steps/<key>/meta.json          written last; its presence means "cached"
    <workspace>/steps/<key>/tables/<t>.parquet  main.parquet, rejected.parquet, ...
    <workspace>/steps/<key>/model/              for steps that produce a model
    <workspace>/steps/.tmp/                     outputs being written (renamed into place)
    <workspace>/steps/.state/<key>/             resumable progress of an interrupted step
    <workspace>/catalog.duckdb                  one view per table name -> parquet
    <workspace parent>/mlflow.db, mlartifacts/  the default MLflow store

Builtin models are converted once per user, outside any workspace: $DATAMILL_MODEL_CACHE, else
$XDG_CACHE_HOME/datamill/models, else ~/.cache/datamill/models (see `model_cache_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from datamill.atomic import replace_folder


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.steps_dir = self.root / "steps"
        self.catalog_path = self.root / "catalog.duckdb"

    # --- step cache ---
    def step_dir(self, key: str) -> Path:
        return self.steps_dir / key

    def is_cached(self, key: str) -> bool:
        """The step finished (meta.json) and its outputs are still whole."""
        return (self.step_dir(key) / "meta.json").is_file() and self.damaged(key) is None

    def meta(self, key: str) -> dict | None:
        path = self.step_dir(key) / "meta.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def damaged(self, key: str) -> str | None:
        """Why a finished step's outputs can no longer be trusted (a table truncated or deleted, a
        model file gone), or None, also for a step that never finished. Cheap enough for every cache
        hit: sizes against those recorded at commit and the Parquet end marker, no re-hashing."""
        folder = self.step_dir(key)
        try:
            meta = self.meta(key)
        except (OSError, ValueError):
            return "its meta.json is unreadable"
        if meta is None:
            return None
        for name, info in meta.get("tables", {}).items():
            why = _parquet_damage(folder / "tables" / f"{name}.parquet", info.get("bytes"))
            if why:
                return f"tables/{name}.parquet {why}"
        model = folder / "model"
        recorded = meta.get("model_files")
        if recorded is not None:
            for name, size in recorded.items():
                path = model / name
                if not path.is_file():
                    return f"model/{name} is missing"
                if path.stat().st_size != size:
                    return f"model/{name} is {path.stat().st_size} bytes, {size} when written"
        elif model.is_dir():  # committed before file sizes were recorded: check what a model needs
            if not any((model / name).is_file() for name in MODEL_CONFIGS):
                return "model/ has no config.json"
            if not any(next(model.glob(pattern), None) for pattern in MODEL_WEIGHTS):
                return "model/ has no weights file (*.safetensors, *.bin)"
        return None

    def table_path(self, key: str, table: str = "main") -> Path:
        return self.step_dir(key) / "tables" / f"{table}.parquet"

    def new_tmp_dir(self, key: str) -> Path:
        tmp = self.steps_dir / ".tmp" / f"{key}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def state_dir(self, key: str) -> Path:
        path = self.steps_dir / ".state" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, key: str, tmp: Path) -> Path:
        """Move a finished step's temp folder into the cache (atomic rename)."""
        # a folder already there is stale: without meta.json, from an older crash
        final = replace_folder(tmp, self.step_dir(key))
        shutil.rmtree(self.steps_dir / ".state" / key, ignore_errors=True)
        return final

    def clean_tmp(self) -> None:
        """Remove temp folders left by killed runs (only called while holding the run lock)."""
        shutil.rmtree(self.steps_dir / ".tmp", ignore_errors=True)

    def lock(self):
        """An exclusive lock on the workspace for the length of a run."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / ".lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            from datamill.errors import DatamillError

            raise DatamillError(f"another datamill run is using the workspace {self.root}")
        return handle

    # --- catalog ---
    def register(self, views: dict[str, Path]) -> None:
        """Point catalog views at parquet files: {"clean": path, "clean__removed": path}."""
        import duckdb

        self.root.mkdir(parents=True, exist_ok=True)
        with duckdb.connect(str(self.catalog_path)) as con:
            for name, path in views.items():
                con.execute(
                    f'CREATE OR REPLACE VIEW "{name}" AS SELECT * FROM read_parquet(?)'.replace(
                        "?", _sql_str(str(path))
                    )
                )

    def tables(self) -> list[str]:
        if not self.catalog_path.exists():
            return []
        import duckdb

        with duckdb.connect(str(self.catalog_path), read_only=True) as con:
            return [r[0] for r in con.execute(
                "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1").fetchall()]

    def sql(self, query: str):
        """Run read-only SQL over the catalog; returns a Polars DataFrame."""
        import duckdb

        if not self.catalog_path.exists():
            from datamill.errors import DatamillError

            raise DatamillError(f"no catalog at {self.catalog_path}: run the spec first")
        with duckdb.connect(str(self.catalog_path), read_only=True) as con:
            return con.sql(query).pl()

    def table(self, name: str):
        """A table of the catalog as a Polars DataFrame."""
        names = self.tables()
        if name not in names:
            from datamill.errors import DatamillError, did_you_mean

            raise DatamillError(f"no table '{name}' in {self.catalog_path}{did_you_mean(name, names)}")
        return self.sql(f'SELECT * FROM "{name}"')


MODEL_CONFIGS = ("config.json", "adapter_config.json")  # a LoRA adapter saved alone has the second
MODEL_WEIGHTS = ("*.safetensors", "*.bin")


def model_files(model: Path) -> dict[str, int]:
    """Byte size of each file of a model folder (relative path -> bytes), recorded at commit."""
    return {str(p.relative_to(model)): p.stat().st_size for p in sorted(model.rglob("*")) if p.is_file()}


def _parquet_damage(path: Path, size_then: int | None) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if size_then is not None and size != size_then:
        return f"is {size} bytes, {size_then} when written"
    with open(path, "rb") as f:  # a Parquet file ends with its footer and the magic bytes PAR1
        f.seek(max(size - 4, 0))
        if f.read(4) != b"PAR1":
            return "is not a whole Parquet file (no PAR1 at its end)"
    return None


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def model_cache_dir() -> Path:
    """Where builtin models are converted, once per user and shared by every spec (SmolLM2 is 517 MB):
    $DATAMILL_MODEL_CACHE, else $XDG_CACHE_HOME/datamill/models, else ~/.cache/datamill/models."""
    env = os.environ.get("DATAMILL_MODEL_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return (base / "datamill" / "models").resolve()
