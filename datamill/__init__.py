"""datamill: a declarative toolkit for data-centric post-training research.

    import datamill
    result = datamill.run("examples/clean.yaml", overrides=["steps.clean.dedup.exact=false"])
    result.table("clean")                 # Polars DataFrame
    datamill.open("examples/.datamill/clean").table("clean")

Importing datamill is cheap: nothing heavy (torch, mlflow, polars) is imported until used.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["run", "plans", "open", "__version__"]


def run(spec, overrides: list[str] | None = None, *, quiet: bool = False):
    """Run a spec (path or dict) and return a `RunResult` (tables, MLflow run ids)."""
    from datamill.api import run as _run

    return _run(spec, overrides, quiet=quiet)


def plans(spec, overrides: list[str] | None = None):
    """The plans (one per sweep point: steps, keys, cached or not) without running anything."""
    from datamill.api import plans as _plans

    return _plans(spec, overrides)


def open(workspace):  # noqa: A001 - `datamill.open(path)` reads naturally
    """A workspace's catalog: `.table(name)` -> Polars, `.sql(query)`, `.tables()`."""
    from datamill.workspace import Workspace

    return Workspace(workspace)
