"""`tasks`: instruction data with known answers from the offline task families (datagen/tasks.py).

    steps:   {t: {tasks: {families: [arithmetic, capitals], n: 100, seed: 0}}}
    sources: {t: {generator: tasks, families: [arithmetic, capitals], n: 100, seed: 0}}

`split: train` (the default) never asks a question of the shipped lm-eval tasks (evals/tasks/,
made from `split: eval`): pools and targets made here are held out from that eval at any seed.

Writes the canonical instruction schema (id = content hash of messages, source = the step's
name, provenance columns null) plus `family`, `answer`, `difficulty`, `choices` (4 options for
multiple choice) and `task_seed` (the row index k that, with `seed`, regenerates the row).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from datagen.tasks import CHAT_JSONL, COUNTRIES_CSV, FAMILIES, GENERATOR_VERSION, check_families, iter_tasks
from datamill.errors import FieldError
from datamill.step import Env, Step, StepConfig

_CHUNK_ROWS = 50_000  # rows per DataFrame chunk: Python dicts cost ~10x their Arrow size


class TasksConfig(StepConfig):
    """Programmatic instruction data whose correct answer is known (offline, deterministic)."""

    families: list[str] = Field(default_factory=lambda: list(FAMILIES),
                                json_schema_extra={"items": {"type": "string", "enum": list(FAMILIES)}})
    """Task families, rows dealt round-robin over them (repeat one to weight it). Default: all of
    arithmetic, reverse, sort, capitals, units, code, chat (generic chit-chat: a distractor family)."""
    n: int = Field(gt=0)
    """Number of rows. Raising it keeps the first rows as they were."""
    seed: int = 0
    """Seed: row k draws from random.Random(f"{seed}:{family}:{k}"). Two seeds of the same split can
    share questions (small families repeat); for an eval set use `split: eval`, not another seed."""
    difficulty: Literal["easy", "medium", "hard"] = "medium"
    """Operand digits (1/2/3), word and list lengths, unit precision, snippet complexity; for capitals,
    easy asks only capital/continent questions with wrong options from anywhere; chat ignores it."""
    split: Literal["train", "eval"] = "train"
    """Which side of the fixed held-out partition the questions come from. `train` (pools, targets)
    and `eval` (what the shipped lm-eval tasks datamill_<family>_* are made from) never share a
    question, at any seed, n or difficulty: they partition what is asked (capitals: the countries,
    40 % eval; chat: the prompts, a third eval; the other families: ~20 % of the operands, lists,
    words, quantities or snippets, by hash). See datagen/tasks.py."""


class TasksStep(Step):
    """Make `n` rows with known answers from the offline task families."""

    kind = "tasks"
    Config = TasksConfig
    source_generator = True

    def check(self, env: Env) -> None:
        try:
            check_families(self.config.families)
        except ValueError as err:
            raise FieldError("families", str(err)) from None

    def key_material(self, env: Env) -> dict:
        from datamill.hashing import hash_file

        return {"generators": GENERATOR_VERSION, "countries": hash_file(COUNTRIES_CSV),
                "chat": hash_file(CHAT_JSONL)}

    def run(self, ctx) -> None:
        import polars as pl

        from datamill.progress import track
        from datamill.records import PROVENANCE_COLUMNS, concat_frames, records_frame, row_id

        cfg = self.config
        rows = iter_tasks(cfg.families, cfg.n, cfg.seed, cfg.difficulty, cfg.split)
        frames, chunk = [], []
        per_family: dict[str, int] = {}
        for row in track(rows, f"{ctx.name}: tasks", total=cfg.n):
            chunk.append({"id": row_id(row["messages"]), "messages": row["messages"], "source": ctx.name,
                          **dict.fromkeys(PROVENANCE_COLUMNS), "family": row["family"],
                          "answer": row["answer"], "difficulty": row["difficulty"],
                          "choices": row["choices"], "task_seed": row["task_seed"]})
            per_family[row["family"]] = per_family.get(row["family"], 0) + 1
            if len(chunk) >= _CHUNK_ROWS:
                frames.append(records_frame(chunk))
                chunk = []
        if chunk or not frames:
            frames.append(records_frame(chunk))
        table = concat_frames(frames).with_columns(pl.col("choices").cast(pl.List(pl.String)),
                                                   pl.col("task_seed").cast(pl.Int64))
        ctx.write(table)
        ctx.stats.update({"rows_out": table.height, "per_family": per_family,
                          "distinct_ids": table["id"].n_unique()})
        ctx.log_sample(table)
