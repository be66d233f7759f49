"""Contamination warnings: training data that reaches an evaluation with no `decontaminate`
step between them, and overlaps the eval's questions.

    for warning in contamination_warnings(plan):      # `datamill plan`, and `run` before an eval
        print(warning.message)

A model's training data is known from the plan: the input tables of the step that made it (and
of the steps that made the model it started from). A table is clean of a task when every path
from a source to it passes through a step that cleans against that task (`Step.cleans_against`,
e.g. `decontaminate`). For the tables that are not, the eval stage's n-gram index
(`function("contamination")`, Tulu 3's rule) measures the overlap, once per (table key, tasks):
results are kept in the workspace. A table not built yet is measured when the run reaches the
evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from datamill.hashing import hash_obj


@dataclass
class ContaminationWarning:
    evaluate: str  # the step that evaluates
    model: str  # the model it evaluates (as written)
    table: str  # the training table that overlaps
    task: str
    overlapping: int  # eval instances that overlap a training row
    instances: int

    @property
    def share(self) -> float:
        return self.overlapping / self.instances if self.instances else 0.0

    @property
    def message(self) -> str:
        return (f"warning: '{self.table}', training data of model '{self.model}', overlaps eval task {self.task} "
                f"(evaluated by '{self.evaluate}'): {self.overlapping} of its {self.instances} questions "
                f"({self.share:.1%}) share 8-grams with it. Add a decontaminate step before training "
                f"({{decontaminate: {{input: {self.table}}}}}), or read `{self.evaluate}`'s clean-subset metrics.")


def training_tables(plan, model_ref: str, _seen: frozenset = frozenset()) -> list[str]:
    """The tables a model was trained on: for a model made by a step of the plan, that step's
    input tables, and those of the step that made the model it started from; [] otherwise."""
    names = {ps.name for ps in plan.steps}
    if model_ref not in names or model_ref in _seen:
        return []
    ps = plan.by_name(model_ref)
    if not ps.step.produces_model:
        return []
    tables = [table for _, table in ps.step.input_tables()]
    for _, ref in ps.step.model_refs():
        tables += training_tables(plan, ref, _seen | {model_ref})
    return list(dict.fromkeys(tables))


def clean_of(plan, table: str, task: str) -> bool:
    """Whether every path from a source to `table` passes a step that cleans it of `task`."""
    from datamill.spec import table_base

    ps = plan.by_name(table_base(table))
    if task in ps.step.cleans_against(plan.resolved.env):
        return True
    inputs = [t for _, t in ps.step.input_tables()]
    return bool(inputs) and all(clean_of(plan, t, task) for t in inputs)


def exposures(plan) -> list[tuple[str, str, str, dict[str, tuple[Path, ...]]]]:
    """(evaluate step, model, training table, {task: task folders}) for every evaluation of a
    model whose training table is not clean of those tasks."""
    env = plan.resolved.env
    out = []
    for ps in plan.steps:
        tasks = ps.step.eval_tasks(env)
        if not tasks:
            continue
        for _, ref in ps.step.model_refs():
            for table in training_tables(plan, ref):
                dirty = {task: folders for task, folders in tasks.items() if not clean_of(plan, table, task)}
                if dirty:
                    out.append((ps.name, ref, table, dirty))
    return out


def contamination_warnings(plan, only: str | None = None) -> list[ContaminationWarning]:
    """The warnings for the plan's evaluations (or only the evaluate step `only`) whose training
    tables are built: one per (evaluation, table, task) with a non-zero overlap."""
    warnings = []
    for evaluate, model, table, tasks in exposures(plan):
        if only is not None and evaluate != only:
            continue
        path = plan.table_path(table)
        if not path.is_file():
            continue
        # the evaluate step's key holds its task files' hashes: an edited task is measured again
        for task, found in measure(plan.workspace.root, path, tasks, plan.by_name(evaluate).key).items():
            if found["overlapping"]:
                warnings.append(ContaminationWarning(evaluate, model, table, task, found["overlapping"],
                                                     found["instances"]))
    return warnings


def measure(root: Path, path: Path, tasks: dict[str, tuple[Path, ...]], salt: str = "") -> dict[str, dict]:
    """{task: {instances, overlapping, share}} of one built table (its path holds its step's
    key), kept in the workspace's `contamination/` folder under (path, tasks, salt)."""
    from datamill.registry import function
    from datamill.step import write_json_atomic

    folder = Path(root) / "contamination"
    memo = folder / f"{hash_obj([str(path), {t: [str(f) for f in fs] for t, fs in sorted(tasks.items())}, salt])}.json"
    if memo.is_file():
        return json.loads(memo.read_text())
    import polars as pl

    found = function("contamination")(prompt_texts(pl.read_parquet(path)), {t: list(fs) for t, fs in tasks.items()})
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(memo, found)
    return found


def prompt_texts(table) -> list[str]:
    """What a training row asks: its user turns joined (a `messages` table), else its `text`."""
    from datamill.records import column_texts, is_messages_column

    if "messages" in table.columns and is_messages_column(table, "messages"):
        return ["\n".join(m["content"] or "" for m in (messages or []) if m.get("role") == "user")
                for messages in table["messages"].to_list()]
    return column_texts(table, "text") if "text" in table.columns else [""] * table.height
