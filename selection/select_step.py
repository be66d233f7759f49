"""`select`: score every candidate against a target table with one method and keep the top budget.

Outputs:
    tables/main     the selected rows in rank order, with `select_score` and `select_rank`
    tables/scores   every candidate: id, score, rank, selected (+ family): each row's selection
                    decision, the lineage from a row to the models trained on it
    scores.png      score histogram, selected vs not (also logged to MLflow)

Ranks are by score, highest first; ties keep the input order. `per_family` caps how many rows of
one `family_column` value are kept; the budget is then filled from the next ranks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import Field, field_validator

from datamill.errors import DatamillError, FieldError, SpecError
from datamill.step import Step, StepConfig
from datamill.user_code import UserCodeError, is_reference, load_function, module_file
from selection.methods import SELECTORS

EXECUTION_ONLY_PARAMS = ("workers",)  # method params that change speed, not scores: out of the key
SAMPLE_ROWS = 20


class SelectConfig(StepConfig):
    """Keep the candidates that matter most for a target task (ZIP-FIT, random, length, your own)."""

    input: str
    """Candidate table."""
    target: str
    """Table of examples that embody the target task."""
    method: str = Field("zipfit", description=(
        f"Scoring method: a built-in ({', '.join(sorted(SELECTORS.builtins))}), one you registered "
        "(selection/methods.py), or your function as `module:function` (a module in the spec's folder "
        "or a `code:` folder, or a function an installed datamill plugin exposes)."))
    budget: Union[int, float]
    """Rows to keep: a count (200) or a fraction of the candidates (0.1). When the pool (or the
    `per_family` caps) run out first, fewer rows are kept and the stats say `budget_clipped`."""
    params: dict[str, Any] = {}
    """Keyword arguments of the method, e.g. {level: 9, mode: fast} for zipfit, {longest: false} for length.
    `workers` (processes) is not part of the cache key."""
    column: Optional[str] = None
    """Candidate text column: default `messages` (contents joined by newlines), else `text`."""
    target_column: Optional[str] = None
    """Target text column (same default)."""
    per_family: Optional[int] = Field(None, ge=1)
    """At most this many selected rows per value of `family_column`."""
    family_column: str = "family"
    """Column that `per_family` caps and the target-family precision stat reads."""
    seed: int = 0
    """Seed for methods that draw random numbers (random, dsir's resampling)."""
    model: Optional[str] = None
    """A model the method uses (density: the embedder instead of all-MiniLM-L6-v2): a `models:`
    name, a trained step, or a model reference."""

    @field_validator("budget")
    @classmethod
    def _budget(cls, value):
        if isinstance(value, bool) or value <= 0:
            raise ValueError("budget must be a positive count or a fraction in (0, 1]")
        if isinstance(value, float) and value > 1:
            raise ValueError(f"a fractional budget must be at most 1, found {value}: write a count as an integer")
        return value


class SelectStep(Step):
    """Score candidates against a target table and keep the top budget; every decision is kept."""

    kind = "select"
    Config = SelectConfig
    version = "2"  # 2: LESS weighs checkpoints by the rates their epochs trained with
    side_tables = ("scores",)

    def input_tables(self):
        return [(("input",), self.config.input), (("target",), self.config.target)]

    def model_refs(self):
        return [(("model",), self.config.model)] if self.config.model else []

    def check(self, env) -> None:
        from selection.methods import selector

        try:
            if is_reference(self.config.method):
                module_file(self.config.method, env)
            else:
                selector(self.config.method)
        except (SpecError, UserCodeError) as e:
            raise FieldError("method", str(e)) from None

    def key_config(self) -> dict:
        config = super().key_config()
        config["params"] = {k: v for k, v in config["params"].items() if k not in EXECUTION_ONLY_PARAMS}
        return config

    def key_material(self, env) -> dict:
        # Your own method changes when its code does (built-ins change with `version`).
        import inspect

        from datamill.hashing import hash_file
        from selection.methods import is_builtin, selector

        method = self.config.method
        try:
            if is_reference(method):
                return {"method_module": hash_file(module_file(method, env))}
            if not is_builtin(method):
                return {"method_source": inspect.getsource(selector(method))}
        except (SpecError, UserCodeError, OSError, TypeError):
            pass  # check() reports a missing method; a function without source keys by name
        return {}

    def comparison_metrics(self, stats: dict) -> dict[str, float]:
        """The share of the selection from the target's family, when the rows carry families."""
        return {"target_family_precision": stats["target_family_precision"]} if "target_family_precision" in stats else {}

    def comparison_examples(self, out_dir: Path) -> dict:
        """The target-family precision per selected row (1: of the target's family), for its interval."""
        import json

        import numpy as np
        import polars as pl

        from datamill.comparison import ExampleScores

        meta, scores = Path(out_dir) / "meta.json", Path(out_dir) / "tables" / "scores.parquet"
        family = json.loads(meta.read_text())["stats"].get("target_family") if meta.is_file() else None
        if family is None or not scores.is_file():
            return {}
        picked = pl.read_parquet(scores, columns=["id", "selected", "family"]).filter(pl.col("selected"))
        return {"target_family_precision": ExampleScores(
            [str(i) for i in picked["id"]], np.asarray((picked["family"] == family).to_list(), dtype=float))}

    def run(self, ctx) -> None:
        import numpy as np
        import polars as pl

        from datamill import progress
        from datamill.records import column_texts, text_column
        from selection.methods import call, selector, wants

        cfg = self.config
        started = time.monotonic()
        method = load_function(cfg.method, ctx.env) if is_reference(cfg.method) else selector(cfg.method)
        target_rows = ctx.read(cfg.target)
        if target_rows.height == 0:
            raise DatamillError(f"target table '{cfg.target}' is empty: selection needs examples of the target task")
        n = ctx.input_rows(cfg.input)
        if n == 0:
            raise DatamillError(f"input table '{cfg.input}' is empty: nothing to select from")
        targets = column_texts(target_rows, text_column(target_rows, cfg.target_column, f"select target '{cfg.target}'"))
        # A method that asks for the candidate table gets it whole; otherwise only the columns
        # scoring needs are read, a batch at a time: at a million rows the table is gigabytes.
        rows = ctx.read(cfg.input) if wants(method, "rows") else None
        texts, ids, families = self._candidate_columns(ctx, rows)
        budget = cfg.budget if isinstance(cfg.budget, int) else max(1, round(cfg.budget * n))
        prepared = time.monotonic()

        work_dir = Path(ctx.state_dir) / "work"
        work_dir.mkdir(parents=True, exist_ok=True)
        with progress.bar(f"{ctx.name}: {cfg.method}", total=n, unit="rows") as bar:
            context = {"rows": rows, "target_rows": target_rows, "seed": cfg.seed,
                       "model_dir": Path(ctx.model_path(cfg.model)) if cfg.model else None,
                       "work_dir": work_dir, "cache_dir": Path(ctx.shared_dir) / "select", "progress": bar.advance,
                       "shards": ctx.shards}
            scores = np.asarray(call(method, texts, targets, dict(cfg.params), context), dtype=np.float64)
        scored = time.monotonic()
        ctx.stats.update(ctx.shards.summary())
        if scores.shape != (n,):
            raise DatamillError(f"method '{cfg.method}' returned {scores.shape} scores for {n} candidates")
        if not np.isfinite(scores).all():
            bad = int((~np.isfinite(scores)).sum())
            raise DatamillError(f"method '{cfg.method}' returned {bad} non-finite scores (NaN or inf)")

        order = np.argsort(-scores, kind="stable")  # ties keep the input order
        if cfg.per_family and families is None:
            raise DatamillError(f"per_family needs a '{cfg.family_column}' column in '{cfg.input}'; "
                                "set family_column")
        chosen = _choose(order, budget, families, cfg.per_family)
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(1, n + 1)
        selected = np.zeros(n, dtype=bool)
        selected[chosen] = True

        score_table = pl.DataFrame({"id": ids, "score": scores, "rank": rank, "selected": selected})
        if families is not None:
            score_table = score_table.with_columns(pl.Series("family", families, dtype=pl.String))
        ctx.write(self._kept_rows(ctx, rows, selected, scores, rank))
        ctx.write(score_table, "scores")
        self._report(ctx, score_table, texts, targets, target_rows, budget, chosen,
                     {"prepare": prepared - started, "score": scored - prepared, "select": time.monotonic() - scored})

    def _candidate_columns(self, ctx, rows):
        """(texts, ids, families or None) of the candidates: from `rows` when read whole, else
        streamed from the input's text, id and family columns."""
        import polars as pl

        from datamill.records import column_texts, text_column

        cfg = self.config
        head = rows if rows is not None else pl.read_parquet(ctx.input_path(cfg.input), n_rows=0)
        column = text_column(head, cfg.column, f"select input '{cfg.input}'")
        wanted = [c for c in dict.fromkeys([column, "id", cfg.family_column]) if c in head.columns]
        batches = [rows.select(wanted)] if rows is not None else ctx.read_batches(cfg.input, columns=wanted)
        texts: list[str] = []
        ids: list[str] = []
        families: list | None = [] if cfg.family_column in head.columns else None
        for batch in batches:
            texts.extend(column_texts(batch, column))
            ids.extend(batch["id"].cast(pl.String).to_list() if "id" in batch.columns
                       else (str(i) for i in range(len(ids), len(ids) + batch.height)))
            if families is not None:
                families.extend(batch[cfg.family_column].to_list())
        return texts, ids, families

    def _kept_rows(self, ctx, rows, selected, scores, rank):
        """The selected rows in rank order, with their score and rank; streamed from the input
        (only selected rows are held) when the table was not read whole."""
        import numpy as np
        import polars as pl

        if rows is not None:
            batches = [rows]
        else:
            batches = ctx.read_batches(self.config.input)
        parts, offset = [], 0
        for batch in batches:
            picked = np.flatnonzero(selected[offset:offset + batch.height])
            part = batch[picked.tolist()].drop([c for c in ("select_score", "select_rank") if c in batch.columns])
            at = picked + offset
            parts.append(part.with_columns(pl.Series("select_score", scores[at]), pl.Series("select_rank", rank[at])))
            offset += batch.height
        return pl.concat(parts, how="vertical_relaxed").sort("select_rank")

    def _report(self, ctx, score_table, texts, targets, target_rows, budget, chosen, seconds) -> None:
        import polars as pl

        cfg = self.config
        ctx.stats.update({"method": cfg.method, "budget": budget, "candidates": len(texts), "targets": len(targets),
                          "selected": int(len(chosen)), "budget_clipped": len(chosen) < budget,
                          "seconds": {k: round(v, 3) for k, v in seconds.items()}})
        if "family" in score_table.columns and cfg.family_column in target_rows.columns:
            target_families = set(target_rows[cfg.family_column].drop_nulls().to_list())
            if len(target_families) == 1:  # one target family: how much of the selection is of it
                family = target_families.pop()
                picked = score_table.filter(pl.col("selected"))
                ctx.stats["target_family"] = family
                ctx.stats["target_family_precision"] = round(
                    picked.filter(pl.col("family") == family).height / max(picked.height, 1), 4)
        plot = Path(ctx.out_dir) / "scores.png"
        from datamill.plots import histogram

        histogram(plot, {"selected": score_table.filter(pl.col("selected"))["score"].to_list(),
                         "not selected": score_table.filter(~pl.col("selected"))["score"].to_list()},
                  title=f"{ctx.name}: {cfg.method} scores", xlabel="score (higher = kept first)")
        ctx.log_artifact(plot)
        ranked = score_table.with_row_index("at").sort("rank")  # texts stay unsliced: only 2 x 20 are shown
        for name, part in (("top", ranked.head(SAMPLE_ROWS)), ("bottom", ranked.tail(SAMPLE_ROWS))):
            shown = pl.Series("text", [texts[i][:300] for i in part["at"]])
            ctx.log_sample(part.drop("at").with_columns(shown), name=name, rows=SAMPLE_ROWS)


def _choose(order, budget: int, families: list | None, per_family: int | None):
    """Indices kept, in rank order: the top `budget`, at most `per_family` of any family."""
    import numpy as np

    if per_family is None or families is None:
        return order[:budget]
    counts: dict = {}
    kept = []
    for i in order:
        family = families[i]
        if counts.get(family, 0) >= per_family:
            continue
        counts[family] = counts.get(family, 0) + 1
        kept.append(i)
        if len(kept) == budget:
            break
    return np.asarray(kept, dtype=np.int64)
