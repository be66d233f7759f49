"""Run plans: each step in order, reused from the cache when its key is there.

A step writes into a temp folder; only when `run` returns is `meta.json` written and the
folder renamed to its key. A crash or SIGKILL mid-step leaves at most a temp folder, which
no later run trusts (and the next run deletes). One MLflow run per point; a sweep also
gets a parent run (what each run logs: datamill/run_tracking.py). A Ray executor's sweep runs
its points at the same time (datamill/points.py).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from datamill import progress
from datamill.errors import DatamillError, StepFailed
from datamill.hashing import hash_file
from datamill.plan import Plan, PlannedStep
from datamill.points import Together, run_points_at_once
from datamill.run_tracking import experiment_name, is_sweep, logged_before, make_tracker, run_fields, sweep_digest
from datamill.secrets import redact_config
from datamill.shards import make_shards
from datamill.spec import side_table
from datamill.step import StepContext, write_json_atomic
from datamill.tracker import NullTracker, StepRecord, TableRecord
from datamill.workspace import Workspace, model_cache_dir, model_files


@dataclass
class PointResult:
    label: str  # "" without a sweep, else "method=zipfit,budget=200"
    point: dict
    run_id: str
    plan: Plan
    steps: dict[str, StepRecord] = field(default_factory=dict)


@dataclass
class RunResult:
    """What `datamill.run` returns: every point's steps and MLflow run ids."""

    workspace: Workspace
    run_id: str  # the run (no sweep) or the sweep's parent run
    points: list[PointResult]
    executed: list[str] = field(default_factory=list)  # "<step name>@<key>" of steps that ran (not cached)
    tracking_location: str = ""
    logged_before: bool = False  # nothing ran, and MLflow already held these runs: none were added

    def table(self, name: str, point: int = -1):
        """A table of one point (default: the last) as a Polars DataFrame."""
        import polars as pl

        return pl.read_parquet(self.points[point].plan.table_path(name))

    @property
    def tables(self) -> dict[str, Path]:
        """Catalog name -> parquet path for the last point."""
        return _views(self.points[-1].plan)


def execute(plans: list[Plan], tracker=None) -> RunResult:
    first = plans[0]
    workspace = first.workspace
    spec = first.resolved.spec
    experiment = experiment_name(first)
    lock = workspace.lock()
    try:
        workspace.clean_tmp()
        tracker = tracker or make_tracker(first)
        # we hold the workspace: any of its runs still RUNNING was left by a killed process
        tracker.close_stale_runs(experiment, str(workspace.root))
        result = RunResult(workspace=workspace, run_id="", points=[], tracking_location=tracker.location())
        logged = logged_before(plans, tracker)
        if logged:  # nothing to run and MLflow already holds these results: don't log them twice
            tracker = NullTracker()
        parent = None
        try:
            if is_sweep(plans):
                parent = tracker.start_run(
                    experiment=experiment, run_name=f"{spec.name} (sweep of {len(plans)})", parent_run_id=None,
                    **run_fields(first, "sweep", digest=sweep_digest(plans)))
                result.run_id = parent
            if spec.executor.kind == "ray" and len(plans) > 1:
                result.points.extend(run_points_at_once(
                    plans, tracker, register=lambda plan: workspace.register(_views(plan)),
                    run_point=lambda plan, serial, together: _run_point(plan, serial, experiment, parent, result,
                                                                        together)))
            else:
                for plan in plans:
                    result.points.append(_run_point(plan, tracker, experiment, parent, result))
                    workspace.register(_views(plan))
            result.run_id = result.run_id or result.points[0].run_id
            if parent:
                from datamill.comparison import log_comparison

                log_comparison(result, tracker, parent)
                tracker.end_run(parent, "FINISHED")
        except BaseException as e:
            if parent:
                tracker.end_run(parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
    finally:
        lock.close()
    if logged:
        result.run_id, point_runs = logged
        result.logged_before = True
        for point, run_id in zip(result.points, point_runs):
            point.run_id = run_id
    return result


def _run_point(plan: Plan, tracker, experiment: str, parent: str | None, result: RunResult,
               together: Together | None = None) -> PointResult:
    from rich.markup import escape

    resolved = plan.resolved
    name = resolved.label or resolved.spec.name
    run_id = tracker.start_run(experiment=experiment, run_name=name, parent_run_id=parent,
                               **run_fields(plan, "point" if parent else "run"))
    point = PointResult(label=resolved.label, point=resolved.point, run_id=run_id, plan=plan)
    if resolved.label and together is None:
        progress.console().print(f"[bold]point {resolved.label}[/bold]")
    # points at once: each line says whose it is (escaped: a label's brackets are not markup)
    prefix = escape(f"[{resolved.label}] ") if together is not None else ""
    try:
        for ps in plan.steps:
            _warn_of_contamination(plan, ps, tracker, run_id, prefix)
            with together.step(ps.key) if together is not None else nullcontext():
                record = _run_step(plan, ps, tracker, run_id, together.work if together is not None else None,
                                   prefix)
            point.steps[ps.name] = record
            if not record.cached:
                result.executed.append(f"{ps.name}@{ps.key}")
            tracker.log_step(run_id, record)
    except BaseException as e:
        tracker.end_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end_run(run_id, "FINISHED")
    return point


def _warn_of_contamination(plan: Plan, ps: PlannedStep, tracker, run_id: str, prefix: str) -> None:
    """Before an evaluation: say which of its tasks the model's training data overlaps (with no
    decontaminate step between them), and log each overlap's share on the run."""
    if not ps.step.eval_tasks(plan.resolved.env):
        return
    from datamill.overlap import contamination_warnings

    warnings = contamination_warnings(plan, only=ps.name)
    for warning in warnings:
        progress.warn(f"  {f'[{plan.resolved.label}] ' if prefix else ''}{warning.message}")
    if warnings:
        tracker.log_metrics(run_id, {f"contamination.{w.evaluate}.{w.table}.{w.task}": w.share for w in warnings})


def _run_step(plan: Plan, ps: PlannedStep, tracker, run_id: str, work_lock=None, prefix: str = "") -> StepRecord:
    ws = plan.workspace
    console = progress.console()
    damage = ws.damaged(ps.key)  # a finished step whose files were truncated or deleted since
    if damage:
        from rich.markup import escape

        console.print(f"  {prefix}[red]damaged[/red]  {ps.name}: {escape(damage)}; running it again")
    elif ws.is_cached(ps.key):
        meta = ws.meta(ps.key)
        console.print(f"  {prefix}[dim]cached[/dim]  {ps.name} ({ps.kind}){_rows_note(meta['stats'])}")
        return _record(ws, ps, meta, cached=True)

    console.print(f"  {prefix}[cyan]running[/cyan] {ps.name} ({ps.kind})")
    tmp = ws.new_tmp_dir(ps.key)
    ctx = StepContext(
        name=ps.name, kind=ps.kind, key=ps.key, out_dir=tmp, state_dir=ws.state_dir(ps.key),
        shared_dir=ws.root / "shared",
        env=plan.resolved.env, input_paths=_input_paths(plan, ps), model_paths=_model_paths(plan, ps),
        training_data=_training_data(plan, ps),
        tracker_log=lambda metrics, step=None: tracker.log_metrics(run_id, metrics, step),
        tracker_table=lambda name, columns: tracker.log_table(run_id, name, columns),
        tracker_artifact=lambda path, artifact_path=None: tracker.log_artifact(run_id, path, artifact_path),
        shards=make_shards(plan.resolved.spec.executor, work_lock),
    )
    start, started_at = time.monotonic(), _now()
    try:
        ps.step.run(ctx)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        raise StepFailed(ps.name, ps.kind, e) from e
    seconds = time.monotonic() - start
    if not (tmp / "tables" / "main.parquet").exists() and not (tmp / "model").exists():
        raise StepFailed(ps.name, ps.kind, RuntimeError("the step wrote no output table or model"))
    meta = {
        "name": ps.name, "kind": ps.kind, "key": ps.key, "version": ps.step.version,
        "config": redact_config(ps.step.config.model_dump(mode="json")),
        "inputs": ps.tables_in, "models": ps.models, "stats": ctx.stats, "seconds": round(seconds, 3),
        "tables": _describe_tables(tmp / "tables"),  # digests computed once, reused by cached runs
        "started_at": started_at, "finished_at": _now(),
    }
    if (tmp / "model").is_dir():  # sizes let a later run notice a model file truncated or deleted
        meta["model_files"] = model_files(tmp / "model")
    write_json_atomic(tmp / "meta.json", meta)
    ws.commit(ps.key, tmp)
    console.print(f"  {prefix}[green]done[/green]    {ps.name} ({ps.kind}) in {seconds:.1f}s{_rows_note(ctx.stats)}")
    return _record(ws, ps, meta, cached=False)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _rows_note(stats: dict) -> str:
    rows = stats.get("rows", {})
    if not rows:
        return ""
    parts = [f"{rows['main']} rows"] if "main" in rows else []
    parts += [f"{n} {t}" for t, n in rows.items() if t != "main"]
    note = ": " + ", ".join(parts)
    if stats.get("warning"):  # e.g. a source's main rejection reasons: worth seeing without a query
        from rich.markup import escape

        note += f"\n      [yellow]warning:[/yellow] {escape(stats['warning'])}"
    return note


def _describe_tables(tables_dir: Path) -> dict[str, dict]:
    """rows, content digest and schema of each parquet file (read from the footer, not the rows)."""
    import pyarrow.parquet as pq

    out = {}
    for path in sorted(tables_dir.glob("*.parquet")):
        footer = pq.read_metadata(path)
        out[path.stem] = {"rows": footer.num_rows, "digest": hash_file(path)[:32], "bytes": path.stat().st_size,
                          "schema": {f.name: str(f.type) for f in footer.schema.to_arrow_schema()}}
    return out


def _record(ws: Workspace, ps: PlannedStep, meta: dict, cached: bool) -> StepRecord:
    folder = ws.step_dir(ps.key)
    tables = [
        TableRecord(name=side_table(ps.name, table), path=folder / "tables" / f"{table}.parquet",
                    rows=info["rows"], digest=info["digest"], schema=info["schema"])
        for table, info in meta.get("tables", {}).items()
    ]
    model = folder / "model"
    return StepRecord(name=ps.name, kind=ps.kind, key=ps.key, cached=cached, seconds=meta.get("seconds", 0.0),
                      stats=meta["stats"], tables=tables, model_dir=model if model.exists() else None)


def _input_paths(plan: Plan, ps: PlannedStep) -> dict[str, Path]:
    paths = {}
    for table, ref in ps.tables_in.items():
        key, _, side = ref.partition(":")
        path = plan.workspace.table_path(key, side)
        if not path.exists():
            raise StepFailed(ps.name, ps.kind, DatamillError(f"input table '{table}' does not exist"))
        paths[table] = path
    return paths


def _training_data(plan: Plan, ps: PlannedStep) -> dict[str, list[Path]]:
    from datamill.overlap import training_tables

    return {ref: [plan.table_path(t) for t in training_tables(plan, ref)] for ref in ps.models
            if training_tables(plan, ref)}


def _model_paths(plan: Plan, ps: PlannedStep) -> dict:
    from datamill import models as model_refs

    spec, env = plan.resolved.spec, plan.resolved.env
    cache = model_cache_dir()
    out = {}
    for ref in ps.models:
        if ref in spec.models:
            target = spec.models[ref]
            out[ref] = lambda t=target: model_refs.resolve_model(t, base_dir=env.base_dir, cache_dir=cache)
        elif ref in {s.name for s in plan.steps}:
            out[ref] = lambda r=ref: plan.workspace.step_dir(plan.by_name(r).key) / "model"
        else:
            out[ref] = lambda t=ref: model_refs.resolve_model(t, base_dir=env.base_dir, cache_dir=cache)
    return out


def _views(plan: Plan) -> dict[str, Path]:
    views = {}
    for ps in plan.steps:
        tables_dir = plan.workspace.step_dir(ps.key) / "tables"
        for path in sorted(tables_dir.glob("*.parquet")):
            views[side_table(ps.name, path.stem)] = path
    return views
