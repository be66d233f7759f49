"""`decontaminate`: remove training rows whose prompts overlap the eval tasks (Tulu 3's n-gram rule).

    steps:
      clean: {decontaminate: {input: pool, tasks: [datamill_capitals_exact, datamill_mmlu_dev]}}

Eval instances come from lm-eval's own task objects, offline (the docs lm-eval evaluates,
rendered by the task's `doc_to_text`, less the template's literal text at its two ends), and from
any table named in `tables` (its rows' prompts).
Without `tasks` and `tables`, the tasks are those the spec's evaluate steps measure on. The rule
and where it differs from open-instruct's script: evals/contamination.py.

The input streams: batch by batch (`datamill.step.BATCH_ROWS` rows), each cut into row shards
(`ctx.shards.map`: local or Ray tasks), its kept and removed rows written before the next batch is
read. Memory holds one batch (and its turns) plus the matches found so far, which the report needs;
the tables are the same whatever the batch size.

Outputs:
    tables/main     the input rows that overlap no eval instance, columns unchanged (`mode: flag`:
                    every row, plus `contaminated`, `eval_task`, `eval_doc_id`, `overlap`)
    tables/removed  each removed row with all its columns, plus the eval instance it overlaps most:
                    `eval_task`, `eval_doc_id` (lm-eval's doc_id), `overlap` (share of that
                    instance's words covered) and `matched_ngrams` (up to 5, as normalised text)
    tables/report   one row per (input table, eval task): `eval_instances`, `overlapping_instances`
                    (instances that overlap at least one training row), `share`, `flagged` (share >
                    `flag_share`) and `removed_rows` (training rows that overlap an instance of that
                    task: removed, or marked under `mode: flag`)

Stats (and so MLflow): `rows_in`, `contaminated`, `kept`, `eval_instances`, `flagged_tasks`, and
`tasks.<task>`: its `instances`, `overlapping`, `share` and `flagged`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from datamill.errors import FieldError, did_you_mean
from datamill.step import Step, StepConfig

ADDED_COLUMNS = ("eval_task", "eval_doc_id", "overlap", "matched_ngrams")
FLAG_COLUMNS = ("contaminated", "eval_task", "eval_doc_id", "overlap")
_SHARD_ROWS = 50_000  # training rows per shard at most: bounds the memory of one shard
_MIN_SHARD_ROWS = 1_000  # and at least (a shard has a fixed cost)


class DecontaminateConfig(StepConfig):
    """Remove (or flag) training rows whose prompts overlap eval instances: Tulu 3's n-gram rule."""

    input: str
    """Table to decontaminate."""
    tasks: list[str] = []
    """lm-eval tasks (or groups: their member tasks) whose instances to clean against, e.g.
    [datamill_capitals_exact, datamill_mmlu_dev]. Without `tasks` and `tables`: every task an
    evaluate step of this spec measures on."""
    tables: list[str] = []
    """Tables used as eval sets too: each row's prompt is an instance of an eval set named after the table."""
    column: Optional[str] = None
    """Text column of the input and of `tables`: default `messages` (see `text`), else `text`."""
    text: Literal["prompt", "all"] = "prompt"
    """Which messages of a training row are compared: `prompt` its user turns (as Tulu 3 does),
    `all` every message. Eval tables always give their user turns."""
    match: Literal["ngram", "exact"] = "ngram"
    """`ngram`: Tulu 3's rule (an instance overlaps a row when more than `threshold` of its words lie
    in n-grams the row also holds). `exact`: a turn equals an instance after normalisation
    (NFKC, lowercase, punctuation dropped)."""
    n: int = Field(8, ge=1)
    """Words per n-gram. An instance shorter than `n` words is one n-gram of all its words."""
    threshold: float = Field(0.5, ge=0, lt=1)
    """An instance overlaps a training row when MORE than this share of its words lie in n-grams
    that it shares with that one row (Tulu 3: 0.5)."""
    flag_share: float = Field(0.02, ge=0, le=1)
    """The report flags a task when more than this share of its instances overlap the table (Tulu 3: 2 %)."""
    mode: Literal["remove", "flag"] = "remove"
    """`remove`: contaminated rows go to the `removed` table. `flag`: every row stays, with a
    `contaminated` column and the eval instance it overlaps most (`removed` is then empty)."""
    strip_template: bool = True
    """Leave out of each task's prompts the literal text its `doc_to_text` template puts before the
    first field and after the last ("Question:" ... "Answer:"): open-instruct matches the raw
    question, and a copied question lacks those words. (Eval tables are taken as they are.)"""
    include_path: list[str] = []
    """Folders of your own task YAMLs (relative to the spec), inside the spec's folder or its `code:`
    folders, as for `evaluate`."""


class DecontaminateStep(Step):
    """Training rows against eval instances: the clean rows, what was removed and why, a report per task."""

    kind = "decontaminate"
    Config = DecontaminateConfig
    version = "1"
    side_tables = ("removed", "report")

    def input_tables(self):
        return [(("input",), self.config.input)] + [(("tables", i), t) for i, t in enumerate(self.config.tables)]

    def _include_paths(self, base_dir: Path) -> list[Path]:
        return [(Path(base_dir) / p).resolve() for p in self.config.include_path]

    def resolved_tasks(self, env) -> dict[str, tuple[Path, ...]]:
        """The tasks to clean against, each with its task folders: `tasks`, or (neither `tasks` nor
        `tables` given) those of the spec's evaluate steps."""
        own = tuple(self._include_paths(env.base_dir))
        if self.config.tasks:
            return {t: tuple(dict.fromkeys(own + tuple(env.eval_tasks.get(t, ())))) for t in self.config.tasks}
        if self.config.tables:
            return {}
        return {t: tuple(dict.fromkeys(own + tuple(folders))) for t, folders in env.eval_tasks.items()}

    def cleans_against(self, env) -> set[str]:
        """The tasks whose instances this step removes from its output (none under `mode: flag`):
        those resolved, their groups' member tasks, and every group whose members all are."""
        from evals.harness import group_members, task_index

        if self.config.mode != "remove":
            return set()
        tasks = self.resolved_tasks(env)
        index = task_index(dict.fromkeys(f for folders in tasks.values() for f in folders))
        members = {name: group_members(path) for name, path in index.items()}
        clean, todo = set(), list(tasks)
        while todo:
            name = todo.pop()
            if name not in clean:
                clean.add(name)
                todo += members.get(name, [])
        grew = True
        while grew:  # a group is clean when all of its members are
            grown = {g for g, m in members.items() if m and g not in clean and all(t in clean for t in m)}
            clean |= grown
            grew = bool(grown)
        return clean

    def check(self, env) -> None:
        from evals.harness import checked_task_folders, task_index

        checked_task_folders(self.config.include_path, env)
        tasks = self.resolved_tasks(env)
        if not tasks and not self.config.tables:
            raise FieldError(("tasks",), "no eval tasks to decontaminate against: no evaluate step of this spec "
                             "names `tasks` to take them from; list them here (e.g. tasks: [datamill_mmlu_dev]) "
                             "or give eval `tables`")
        known = task_index(dict.fromkeys(f for folders in tasks.values() for f in folders))
        for i, name in enumerate(self.config.tasks):
            if name not in known:
                raise FieldError(("tasks", i), f"unknown task '{name}'{did_you_mean(name, known)}; available: "
                                 f"{', '.join(sorted(known))}")
        missing = [name for name in tasks if name not in known]
        if missing:
            raise FieldError(("tasks",), f"the evaluate steps' task(s) {', '.join(missing)} are not among the shipped "
                             "tasks or their task folders (lm-eval's built-in tasks are not read offline): name the "
                             "tasks to decontaminate against with `tasks:`")

    def key_material(self, env) -> dict:
        # The tasks' instances decide the output: the names resolved (from `tasks` or the spec's
        # evaluate steps), the YAML of each (and of a group's members), and the other files of the
        # task folders (data, loaders), as `evaluate` keys them.
        from datamill.hashing import hash_file
        from evals.harness import SHIPPED_TASKS, group_members, task_index

        tasks = self.resolved_tasks(env)
        if not tasks:
            return {"tasks": []}  # only eval tables: they are inputs, keyed as such
        folders = [SHIPPED_TASKS, *dict.fromkeys(f for fs in tasks.values() for f in fs)]
        index = task_index(folders[1:])
        names, yamls = list(tasks), set()
        while names:
            path = index.get(names.pop())
            if path is not None and path not in yamls:
                yamls.add(path)
                names += group_members(path)
        return {"tasks": sorted(tasks),
                "task_files": {str(p.relative_to(folder)) + f"@{i}": hash_file(p)
                               for i, folder in enumerate(folders) if folder.is_dir()
                               for p in sorted(folder.rglob("*"))
                               if p.is_file() and "__pycache__" not in p.parts and (p.suffix != ".yaml" or p in yamls)}}

    def comparison_metrics(self, stats: dict) -> dict[str, float]:
        return {}  # a cleaning step: its counts are logged, not compared across a sweep

    def run(self, ctx) -> None:
        import numpy as np
        import polars as pl

        from datamill import progress
        from evals.contamination import build_index, eval_instances, overlapping_instances, template_frames

        cfg = self.config
        sets: dict[str, list[str]] = {}
        frames: dict[str, tuple[str, str]] = {}
        for task, folders in self.resolved_tasks(ctx.env).items():
            work_dir = Path(ctx.shared_dir) / "lm_eval_tasks"
            sets.update(eval_instances([task], folders, work_dir=work_dir))
            if cfg.strip_template:
                frames.update(template_frames([task], folders, work_dir=work_dir))
        for name in cfg.tables:
            sets[name] = self._eval_table_texts(ctx.read(name), name)
        index = build_index(sets, cfg.n, frames)
        # threads in a shard: all cores here, a Ray task's CPUs there
        run_shard = functools.partial(scan_shard, index=index, threshold=cfg.threshold, match=cfg.match,
                                      workers=ctx.shards.cpus_per_shard)

        # The input in batches: each is scanned (in shards), split and written before the next is
        # read; only its matches (row, instance pairs: few) are kept, for the report.
        rows_in, contaminated, start = 0, 0, 0
        pair_rows: list[np.ndarray] = []
        pair_docs: list[np.ndarray] = []
        sample: list = []  # the first removed rows, for the run's tracker
        with ctx.writer() as main, ctx.writer("removed") as removed_out, \
                progress.bar(f"{ctx.name}: decontaminate", total=ctx.input_rows(cfg.input), unit="rows") as bar:
            for batch in ctx.read_batches(cfg.input):
                found, rows, removed = self._batch(ctx, batch, start, index, run_shard, bar)
                pair_rows.append(found.row)
                pair_docs.append(found.doc)
                main.write(rows)
                removed_out.write(removed if cfg.mode == "remove" else removed.head(0))
                if removed.height and sum(s.height for s in sample) < 50:
                    sample.append(removed.head(50))
                contaminated += removed.height
                rows_in += batch.height
                start += batch.height
        found_row, found_doc = np.concatenate(pair_rows), np.concatenate(pair_docs)

        # per eval set: instances that overlap some row, and rows that overlap one of its instances
        overlapping = overlapping_instances(index, found_doc)
        owners = pl.DataFrame([(d, s) for d, owned in enumerate(index.owners)
                               for s in dict.fromkeys(s for s, _ in owned)],
                              schema={"doc": pl.Int64, "set": pl.Int64}, orient="row")
        rows_per_set = (pl.DataFrame({"row": found_row, "doc": found_doc}).join(owners, on="doc")
                        .group_by("set").agg(pl.col("row").n_unique().alias("rows")))
        rows_of = dict(zip(rows_per_set["set"].to_list(), rows_per_set["rows"].to_list()))
        report_rows, task_stats = [], {}
        for s, name in enumerate(index.sets):
            instances, hits = index.sizes[s], len(overlapping[s])
            share = hits / instances if instances else 0.0
            flagged = share > cfg.flag_share
            report_rows.append({"table": cfg.input, "eval_task": name, "eval_instances": instances,
                                "overlapping_instances": hits, "share": share, "flagged": flagged,
                                "removed_rows": int(rows_of.get(s, 0))})
            task_stats[name] = {"instances": instances, "overlapping": hits, "share": round(share, 6),
                                "flagged": flagged}
        report = pl.DataFrame(report_rows, schema={
            "table": pl.String, "eval_task": pl.String, "eval_instances": pl.Int64, "overlapping_instances": pl.Int64,
            "share": pl.Float64, "flagged": pl.Boolean, "removed_rows": pl.Int64})

        ctx.write(report, "report")
        ctx.stats.update({"rows_in": rows_in, "contaminated": contaminated,
                          "kept": rows_in - (contaminated if cfg.mode == "remove" else 0),
                          "eval_instances": sum(index.sizes), "tasks": task_stats,
                          "flagged_tasks": sum(1 for t in task_stats.values() if t["flagged"])})
        ctx.stats.update(ctx.shards.summary())
        ctx.log_sample(report, name="report", rows=len(report_rows))
        if sample:
            ctx.log_sample(pl.concat(sample), name="removed")

    def _batch(self, ctx, batch, start: int, index, run_shard, bar):
        """One batch of the input (its rows are `start`, `start` + 1, ... of the table) against the
        eval index, in row shards -> (its matches, the rows to write to main: kept, or all of them
        flagged under `mode: flag`, and its contaminated rows with their best instance)."""
        import numpy as np
        import polars as pl

        from evals.contamination import Matches, matched_ngrams

        cfg, height = self.config, batch.height
        segments = self._segments(batch, start)
        size = max(_MIN_SHARD_ROWS, min(_SHARD_ROWS, -(-height // (4 * ctx.shards.workers))))
        bounds = [(start + a, start + min(a + size, height)) for a in range(0, height, size)]
        cut = np.searchsorted(segments["row"].to_numpy(), [a for a, _ in bounds] + [start + height])
        shards = [segments.slice(int(cut[i]), int(cut[i + 1] - cut[i])) for i in range(len(bounds))]
        del segments
        parts = ctx.shards.map(run_shard, shards, on_done=lambda i, _: bar.advance(bounds[i][1] - bounds[i][0]))
        found = Matches.concat(parts)
        best_row, best_doc, best_overlap = found.best()  # per row: a batch holds whole rows

        first_owner = [index.owners[d][0] for d in best_doc.tolist()]
        match_columns = [
            pl.Series("eval_task", [index.sets[s] for s, _ in first_owner], dtype=pl.String),
            pl.Series("eval_doc_id", [doc_id for _, doc_id in first_owner], dtype=pl.Int64),
            pl.Series("overlap", best_overlap, dtype=pl.Float64),
        ]
        samples = pl.Series("matched_ngrams", [matched_ngrams(index, d, found.best_positions.get(r, []), cfg.match)
                                               for r, d in zip(best_row.tolist(), best_doc.tolist())],
                            dtype=pl.List(pl.String))
        local = (best_row - start).astype(np.int64)
        contaminated = np.zeros(height, dtype=bool)
        contaminated[local] = True
        base = batch.drop([c for c in ADDED_COLUMNS if c in batch.columns])
        removed = base[local.tolist()].with_columns(*match_columns, samples)
        if cfg.mode == "remove":
            out = batch.filter(pl.Series(~contaminated))
        else:
            marks = pl.DataFrame({"__row": pl.Series(local, dtype=pl.Int64), **{c.name: c for c in match_columns}})
            out = (batch.drop([c for c in FLAG_COLUMNS if c in batch.columns])
                   .with_row_index("__row").with_columns(pl.col("__row").cast(pl.Int64))
                   .join(marks, on="__row", how="left", maintain_order="left")
                   .with_columns(pl.Series("contaminated", contaminated, dtype=pl.Boolean)).drop("__row"))
        return Matches(found.row, found.doc, found.overlap, {}), out, removed

    # --- texts -----------------------------------------------------------------------------
    def _segments(self, table, start: int = 0):
        """The compared text of every training row as (row, text) segments, one per turn
        (messages) or one per row (a text column), rows ascending; the table's first row is row
        `start` (a batch's place in the input)."""
        import polars as pl

        from datamill.records import is_messages_column, text_column

        column = text_column(table, self.config.column, f"decontaminate input '{self.config.input}'")
        row = (pl.int_range(pl.len(), dtype=pl.Int64) + start).alias("row")
        frame = table.select(row, pl.col(column).alias("value"))
        dtype = table.schema[column]
        if is_messages_column(table, column):
            frame = frame.explode("value").drop_nulls("value").unnest("value")
            if self.config.text == "prompt":
                frame = frame.filter(pl.col("role") == "user")
            frame = frame.select("row", pl.col("content").alias("text"))
        elif isinstance(dtype, pl.List):
            frame = frame.explode("value").select("row", pl.col("value").cast(pl.String).alias("text"))
        else:
            frame = frame.select("row", pl.col("value").cast(pl.String).alias("text"))
        return frame.drop_nulls("text")

    def _eval_table_texts(self, table, name: str) -> list[str]:
        """An eval table's instances: each row's user turns (joined), or its text column."""
        from datamill.records import column_texts, is_messages_column, text_column

        column = text_column(table, self.config.column, f"decontaminate eval table '{name}'")
        if not is_messages_column(table, column):
            return column_texts(table, column)
        return ["\n".join(m["content"] for m in (messages or []) if m.get("role") == "user" and m.get("content"))
                for messages in table[column].to_list()]


def scan_shard(segments, *, index, threshold: float, match: str, workers: int = 1):
    """One shard's training rows (a (row, text) frame of their segments, rows ascending) against
    the eval index, in `workers` threads (Polars and numpy let go of the GIL: ~1.6x on 2 cores). A
    plain function of plain values, so a Ray worker can run it."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from evals.contamination import Matches, scan

    rows = segments["row"].to_numpy()
    if not len(rows):
        return Matches.empty()
    # whole rows per thread: a row's coverage adds up over its segments
    cuts = np.unique(np.searchsorted(rows, rows[np.linspace(0, len(rows), max(1, workers) + 1)[1:-1].astype(np.int64)]))
    bounds = list(zip([0, *cuts.tolist()], [*cuts.tolist(), len(rows)]))

    def part(bound: tuple[int, int]) -> Matches:
        a, b = bound
        return scan(index, rows[a:b], segments["text"].slice(a, b - a), threshold=threshold, match=match)

    if len(bounds) == 1:
        return part(bounds[0])
    with ThreadPoolExecutor(max_workers=len(bounds)) as pool:
        return Matches.concat(list(pool.map(part, bounds)))
