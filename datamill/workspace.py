"""The workspace: the content-addressed step cache and the DuckDB catalog over it.

Layout (workspace = `.datamill/<spec name>` next to the spec unless `workspace:` says otherwise):

    <workspace>/steps/<key>/meta.json          written last; its presence means "cached"
    <workspace>/steps/<key>/tables/<t>.parquet  main.parquet, rejected.parquet, ...
    <workspace>/steps/<key>/model/              for steps that produce a model
    <workspace>/steps/.tmp/                     outputs being written (renamed into place)
    <workspace>/steps/.state/<key>/             resumable progress of an interrupted step
    <workspace>/catalog.duckdb                  one view per table name -> parquet
    <workspace parent>/mlflow.db, mlartifacts/  the default MLflow store
    <workspace parent>/models/                  builtin model cache (DATAMILL_MODEL_CACHE overrides)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.steps_dir = self.root / "steps"
        self.catalog_path = self.root / "catalog.duckdb"

    # --- step cache ---
    def step_dir(self, key: str) -> Path:
        return self.steps_dir / key

    def is_cached(self, key: str) -> bool:
        return (self.step_dir(key) / "meta.json").is_file()

    def meta(self, key: str) -> dict | None:
        path = self.step_dir(key) / "meta.json"
        return json.loads(path.read_text()) if path.is_file() else None

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
        final = self.step_dir(key)
        if final.exists():  # a stale folder without meta.json from an older crash
            shutil.rmtree(final)
        os.replace(tmp, final)
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


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def model_cache_dir(workspace_root: Path) -> Path:
    """Builtin models are converted once per project (or once per machine with DATAMILL_MODEL_CACHE)."""
    env = os.environ.get("DATAMILL_MODEL_CACHE")
    return Path(env) if env else Path(workspace_root).resolve().parent / "models"
