"""From a resolved spec to an ordered list of steps with cache keys.

A step's key is the hash of its kind, the version of its implementation, its resolved
config, its inputs' keys, the identities of the models it uses, and whatever else decides
its output (`Step.key_material`, e.g. an input file's content hash). Equal keys mean equal
outputs, so a step whose key is in the workspace is reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datamill.hashing import hash_obj
from datamill.spec import ResolvedSpec, table_base, topo_order
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
            base = table_base(table)
            side = table[len(base) + 2:] if table != base else "main"
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
    """One row per step for `datamill plan`: name, kind, key, status, row counts if cached."""
    rows = []
    for ps in plan.steps:
        meta = plan.workspace.meta(ps.key)
        rows.append({
            "name": ps.name,
            "kind": ps.kind,
            "key": ps.key,
            "status": "cached" if meta else "to run",
            "rows": (meta or {}).get("stats", {}).get("rows", {}),
            "deps": ps.deps,
        })
    return rows


def model_dir(plan: Plan, name: str) -> Path:
    return plan.workspace.step_dir(plan.by_name(name).key) / "model"
