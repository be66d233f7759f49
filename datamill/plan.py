"""From a resolved spec to an ordered list of steps with cache keys.

A step's key is the hash of its kind, the version of its implementation, its resolved
config, its inputs' keys, the identities of the models it uses, and whatever else decides
its output (`Step.key_material`, e.g. an input file's content hash). Equal keys mean equal
outputs, so a step whose key is in the workspace is reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datamill.errors import SpecError, did_you_mean
from datamill.hashing import hash_obj
from datamill.spec import ResolvedSpec, side_table, split_table, table_base, topo_order
from datamill.step import Step
from datamill.workspace import Workspace


@dataclass
class PlannedStep:
    name: str
    step: Step
    key: str
    deps: list[str]
    tables_in: dict[str, str]  # table name -> "<key>:<table>" it reads
    models: dict[str, str]  # model reference as written -> identity

    @property
    def kind(self) -> str:
        return self.step.kind


@dataclass
class Plan:
    resolved: ResolvedSpec
    workspace: Workspace
    steps: list[PlannedStep]

    def by_name(self, name: str) -> PlannedStep:
        return next(s for s in self.steps if s.name == name)

    def table_path(self, table: str) -> Path:
        """Where a table of the plan ("pick", "deduped__removed") is, once its step has run."""
        base, side = split_table(table)
        return self.workspace.table_path(self.by_name(base).key, side)


def build_plan(resolved: ResolvedSpec) -> Plan:
    from datamill import models as model_refs

    spec, env = resolved.spec, resolved.env
    steps = resolved.step_objects()
    graph = {}
    for name, step in steps.items():
        deps = [table_base(t) for _, t in step.input_tables()]
        deps += [ref for _, ref in step.model_refs() if ref in steps and ref not in spec.models]
        graph[name] = list(dict.fromkeys(deps))

    planned: dict[str, PlannedStep] = {}
    for name in topo_order(graph):
        step = steps[name]
        tables_in = {}
        for _, table in step.input_tables():
            base, side = split_table(table)
            tables_in[table] = f"{planned[base].key}:{side}"
        models = {}
        for _, ref in step.model_refs():
            if ref in spec.models:
                models[ref] = model_refs.model_identity(spec.models[ref], env.base_dir)
            elif ref in planned:
                models[ref] = f"step:{planned[ref].key}"
            else:
                models[ref] = model_refs.model_identity(ref, env.base_dir)
        key = hash_obj({
            "kind": step.kind,
            "version": step.version,
            "config": step.key_config(),
            "inputs": tables_in,
            "models": models,
            "extra": step.key_material(env),
        })
        planned[name] = PlannedStep(name, step, key, graph[name], tables_in, models)
    return Plan(resolved=resolved, workspace=Workspace(resolved.workspace_root), steps=list(planned.values()))


def describe(plan: Plan) -> list[dict]:
    """One row per step for `datamill plan`: name, kind, key, status (cached, to run, or damaged:
    finished once but its files were truncated or deleted since, see `damaged`), row counts if cached."""
    rows = []
    for ps in plan.steps:
        damage = plan.workspace.damaged(ps.key)
        meta = None if damage else plan.workspace.meta(ps.key)
        rows.append({
            "name": ps.name,
            "kind": ps.kind,
            "key": ps.key,
            "status": "damaged" if damage else "cached" if meta else "to run",
            "damaged": damage,
            "rows": (meta or {}).get("stats", {}).get("rows", {}),
            "deps": ps.deps,
        })
    return rows


# --------------------------------------------------------------------------- reading what ran
# `datamill sql`, `lineage` and `path` read the outputs of the spec as given (--set included),
# one sweep point at a time or what the points share, never merely whatever ran last.


def choose_point(plans: list[Plan], wanted: str) -> Plan:
    """The sweep point `--point` names: its label ("method=zipfit"), or KEY=VALUE pairs (KEY a
    swept path or its last part) that match exactly one point."""
    labels = [p.resolved.label for p in plans]
    if not any(labels):
        raise SpecError(f"--point {wanted}: the spec has no sweep")
    for plan in plans:
        if plan.resolved.label == wanted:
            return plan
    pairs = [part.partition("=") for part in wanted.split(",")]
    if all(sep and key.strip() for key, sep, _ in pairs):
        matches = [p for p in plans if all(_point_has(p.resolved.point, k.strip(), v.strip()) for k, _, v in pairs)]
        if len(matches) == 1:
            return matches[0]
        found = f"matches {len(matches)} points" if matches else "matches no point"
    else:
        found = "expected a point's label or KEY=VALUE pairs"
    raise SpecError(f"--point {wanted}: {found}; the points are: {', '.join(labels)}")


def _point_has(point: dict, key: str, text: str) -> bool:
    import yaml

    for path, value in point.items():
        if key in (path, str(path).split(".")[-1]):
            if str(value) == text:
                return True
            try:  # typed like --set: "true", "0.5", "[1, 2]"
                if yaml.safe_load(text) == value:
                    return True
            except yaml.YAMLError:
                pass
    return False


def find_step(plans: list[Plan], name: str, point: str | None = None) -> tuple[Plan, PlannedStep] | None:
    """Step `name` of the point `point` names, or, without one, of every point when they all share
    its key; None when the points' versions of it differ. An unknown name is a SpecError."""
    chosen = [choose_point(plans, point)] if point else plans
    found = [(plan, ps) for plan in chosen for ps in plan.steps if ps.name == name]
    if not found:
        names = [ps.name for ps in plans[0].steps]
        raise SpecError(f"no step '{name}' in {plans[0].resolved.path}{did_you_mean(name, names)}")
    if len(found) < len(chosen) or len({ps.key for _, ps in found}) > 1:
        return None
    return found[0]


def not_run(plans: list[Plan], what: str, overrides: list[str] | None) -> str:
    """"<what> has not been run for this spec as given (--set ...): run `datamill run ...` first"."""
    import shlex

    sets = "".join(f" --set {shlex.quote(o)}" for o in overrides or [])
    given = f" ({sets.strip()})" if sets else ""
    return (f"{what} has not been run for this spec as given{given}: "
            f"run `datamill run {shlex.quote(str(plans[0].resolved.path))}{sets}` first")


def table_views(plans: list[Plan], point: str | None = None,
                overrides: list[str] | None = None) -> tuple[dict[str, Path], dict[str, str]]:
    """The spec's tables for `datamill sql`: ({view name: parquet file}, {lower-case view name: why
    it is missing}). Plain names are the tables of the point `point` names or, without one, the
    tables every point shares; a sweep adds "<table>@<label>" for every point's tables. Missing:
    the tables not run, and plain names whose table differs between points."""
    chosen = [choose_point(plans, point)] if point else plans
    views: dict[str, Path] = {}
    problems: dict[str, str] = {}  # lower-case view name -> why it is not there (DuckDB ignores case)

    def offer(view: str, plan: Plan, ps: PlannedStep, side: str) -> None:
        if '"' in view:  # a label with a double quote (a swept SQL string): not a view name DuckDB takes as is
            return
        if not plan.workspace.is_cached(ps.key):
            problems[view.lower()] = not_run(plans, f"table '{view}' (step {ps.name})", overrides)
        elif plan.workspace.table_path(ps.key, side).is_file():
            views[view] = plan.workspace.table_path(ps.key, side)

    for name, side in dict.fromkeys(t for plan in chosen for ps in plan.steps for t in _tables_of(plan, ps)):
        found = find_step(chosen, table_base(name))
        if found is None:
            named = [f'"{name}@{p.resolved.label}"' for p in plans]
            problems[name.lower()] = (
                f"table '{name}' differs between the sweep's points ({', '.join(p.resolved.label for p in plans)}): "
                f"choose one with --point LABEL, or query the point's view: {', '.join(named)}")
        else:
            offer(name, *found, side)
    if any(p.resolved.label for p in plans):
        for plan in plans:
            for ps in plan.steps:
                for name, side in _tables_of(plan, ps):
                    offer(f"{name}@{plan.resolved.label}", plan, ps, side)
    return views, problems


def _tables_of(plan: Plan, ps: PlannedStep) -> list[tuple[str, str]]:
    """(table name, side) of a step: its main table and side tables, written or declared."""
    written = [p.stem for p in sorted((plan.workspace.step_dir(ps.key) / "tables").glob("*.parquet"))]
    sides = dict.fromkeys(["main", *ps.step.side_tables, *written])
    return [(side_table(ps.name, side), side) for side in sides]
