"""Run plans: each step in order, reused from the cache when its key is there.

A step writes into a temp folder; only when `run` returns is `meta.json` written and the
folder renamed to its key. A crash or SIGKILL mid-step leaves at most a temp folder, which
no later run trusts (and the next run deletes). One MLflow run per point; a sweep also
gets a parent run.
"""

from __future__ import annotations

import subprocess
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from datamill import progress
from datamill.errors import DatamillError, StepFailed
from datamill.hashing import hash_file
from datamill.plan import Plan, PlannedStep
from datamill.secrets import redact_config, scrub
from datamill.shards import make_shards
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


def tracking_target(plan: Plan) -> tuple[str, Path]:
    """(tracking URI, local artifact root): the spec's, else $MLFLOW_TRACKING_URI, else a
    sqlite store next to the workspace."""
    import os

    root = plan.workspace.root.parent
    uri = plan.resolved.spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
    return uri, root / "mlartifacts"


def make_tracker(plan: Plan):
    if not plan.resolved.spec.tracking.enabled:
        return NullTracker()
    from datamill.registry import tracker_class

    return tracker_class("mlflow")(*tracking_target(plan))


def execute(plans: list[Plan], tracker=None) -> RunResult:
    first = plans[0]
    workspace = first.workspace
    spec = first.resolved.spec
    experiment = _experiment(first)
    lock = workspace.lock()
    try:
        workspace.clean_tmp()
        tracker = tracker or make_tracker(first)
        # we hold the workspace: any of its runs still RUNNING was left by a killed process
        tracker.close_stale_runs(experiment, str(workspace.root))
        result = RunResult(workspace=workspace, run_id="", points=[], tracking_location=tracker.location())
        logged = _logged_before(plans, tracker)
        if logged:  # nothing to run and MLflow already holds these results: don't log them twice
            tracker = NullTracker()
        parent = None
        try:
            if _is_sweep(plans):
                parent = tracker.start_run(
                    experiment=experiment, run_name=f"{spec.name} (sweep of {len(plans)})", parent_run_id=None,
                    params=_params(first, sweep=True), tags=_tags(first, role="sweep", digest=_sweep_digest(plans)),
                    spec_yaml=_spec_yaml(first, sweep=True))
                result.run_id = parent
            if spec.executor.kind == "ray" and len(plans) > 1:
                _run_points_at_once(plans, tracker, experiment, parent, result)
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


def _experiment(plan: Plan) -> str:
    return plan.resolved.spec.tracking.experiment or plan.resolved.spec.name


def _is_sweep(plans: list[Plan]) -> bool:
    return len(plans) > 1 or bool(plans[0].resolved.point)


# An unchanged re-run reuses every step; logging it again would only add copies of the same
# runs to MLflow. Each run carries a digest of what it logged (DIGEST_TAG: the experiment, spec,
# point and every step's key; a sweep's parent: its points'), so a re-run whose steps are all
# cached asks the store for FINISHED runs with its digests (Tracker.find_runs: a query; on a
# sqlite store without starting MLflow, which takes seconds) and reuses them. Runs deleted since
# are not found: the results are logged again.

DIGEST_TAG = "datamill.digest"


def _point_digest(plan: Plan) -> str:
    from datamill.hashing import hash_obj

    return hash_obj([_experiment(plan), plan.resolved.spec.name, plan.resolved.label,
                     [(s.name, s.key) for s in plan.steps]])


def _sweep_digest(plans: list[Plan]) -> str:
    from datamill.hashing import hash_obj

    return hash_obj([_experiment(plans[0]), [_point_digest(p) for p in plans]])


def _logged_before(plans: list[Plan], tracker) -> tuple[str, list[str]] | None:
    """(the run id, each point's run id) of runs in the store that already hold exactly what
    this run would log, or None (then it logs)."""
    ws = plans[0].workspace
    if not all(ws.is_cached(s.key) for p in plans for s in p.steps):
        return None
    experiment = _experiment(plans[0])
    if not _is_sweep(plans):
        found = tracker.find_runs(experiment, {DIGEST_TAG: _point_digest(plans[0]), "datamill.role": "run"})
        return (found[0][0], [found[0][0]]) if found else None
    digests = [_point_digest(p) for p in plans]
    for parent, _ in tracker.find_runs(experiment, {DIGEST_TAG: _sweep_digest(plans), "datamill.role": "sweep"}):
        children = {tags.get(DIGEST_TAG): run_id
                    for run_id, tags in tracker.find_runs(experiment, {"mlflow.parentRunId": parent})}
        if all(d in children for d in digests):  # a child deleted since: not this parent
            return parent, [children[d] for d in digests]
    return None


class _Serialized:
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


class _Together:
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


def _run_points_at_once(plans: list[Plan], tracker, experiment: str, parent: str | None, result: RunResult) -> None:
    """A Ray executor's sweep: every point in a thread of its own, so that the points' Ray tasks
    (evaluation tasks, scoring slices, generation requests, training workers) run at the same
    time. The first failure (in point order) is raised once every point has stopped."""
    together, tracker = _Together(), _Serialized(tracker)
    points: list[PointResult | None] = [None] * len(plans)
    errors: list[BaseException | None] = [None] * len(plans)

    def run(i: int) -> None:
        try:
            points[i] = _run_point(plans[i], tracker, experiment, parent, result, together)
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
            plans[0].workspace.register(_views(plan))
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        raise failed
    result.points.extend(points)


def _run_point(plan: Plan, tracker, experiment: str, parent: str | None, result: RunResult,
               together: _Together | None = None) -> PointResult:
    from rich.markup import escape

    resolved = plan.resolved
    name = resolved.label or resolved.spec.name
    run_id = tracker.start_run(
        experiment=experiment, run_name=name, parent_run_id=parent, params=_params(plan),
        tags=_tags(plan, role="point" if parent else "run"), spec_yaml=_spec_yaml(plan))
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
        TableRecord(name=ps.name if table == "main" else f"{ps.name}__{table}", path=folder / "tables" / f"{table}.parquet",
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
            views[ps.name if path.stem == "main" else f"{ps.name}__{path.stem}"] = path
    return views


# --------------------------------------------------------------------------- what MLflow gets


SWEPT = "(swept: see sweep)"


def _dump(plan: Plan, sweep: bool = False) -> dict:
    """The resolved spec; for a sweep's parent, the swept fields say so instead of showing the
    first point's values (the parent is every point)."""
    data = redact_config(plan.resolved.spec.model_dump(mode="json", exclude_none=True))
    if sweep:
        for dotted in plan.resolved.point:
            *parents, last = str(dotted).split(".")
            node = data
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and last in node:
                node[last] = SWEPT
    return data


def _params(plan: Plan, sweep: bool = False) -> dict:
    params = _dump(plan, sweep)
    params.pop("sweep", None)
    if sweep:
        params["sweep"] = redact_config(plan.resolved.raw.get("sweep") or {})
    else:
        params.update({f"point.{k}": v for k, v in plan.resolved.point.items()})
    return params


def _spec_yaml(plan: Plan, sweep: bool = False) -> str:
    import yaml

    data = _dump(plan, sweep)
    if sweep:
        data["sweep"] = redact_config(plan.resolved.raw.get("sweep") or {})
    return scrub(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def _tags(plan: Plan, role: str, digest: str | None = None) -> dict[str, str]:
    """A run's tags; `digest`: what the run holds (DIGEST_TAG), by default this plan's point."""
    from datamill import __version__

    tags = {"datamill.spec": plan.resolved.spec.name, "datamill.version": __version__, "datamill.role": role,
            "datamill.spec_file": str(plan.resolved.path.resolve()), "datamill.workspace": str(plan.workspace.root),
            DIGEST_TAG: digest or _point_digest(plan)}
    if plan.resolved.label and role != "sweep":  # a sweep's parent is all of its points, not the first
        tags["datamill.point"] = plan.resolved.label
    if plan.resolved.spec.description:
        tags["mlflow.note.content"] = plan.resolved.spec.description
    commit = _git_commit(plan.resolved.env.base_dir)
    if commit:
        tags["datamill.git_commit"] = commit
    return tags


def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
