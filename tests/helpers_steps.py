"""Run one step directly, without the spec loader or executor: build its config and a
StepContext in a temp folder, run it, and read back the tables it wrote."""

from __future__ import annotations

from pathlib import Path

from datamill.step import Env, StepContext


def run_step(step_class, config: dict, tmp_path: Path, name: str = "step", inputs: dict | None = None,
             base_dir: Path | None = None):
    """-> (ctx, {table: polars.DataFrame}). `inputs` maps table names to DataFrames."""
    import polars as pl

    step = step_class(name, step_class.Config.model_validate(config))
    env = Env(base_dir=base_dir or tmp_path)
    step.check(env)
    input_paths = {}
    for table, frame in (inputs or {}).items():
        path = tmp_path / "inputs" / f"{table}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(path)
        input_paths[table] = path
    out_dir = tmp_path / "out" / name
    ctx = StepContext(name=name, kind=step.kind, key="test", out_dir=out_dir,
                      state_dir=tmp_path / "state" / name, shared_dir=tmp_path / "shared",
                      env=env, input_paths=input_paths,
                      model_paths={})
    step.run(ctx)
    tables = {p.stem: pl.read_parquet(p) for p in sorted((out_dir / "tables").glob("*.parquet"))}
    return ctx, tables
