"""Step kinds used only by tests, registered the way a plugin would register its own."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from datamill.registry import register_step
from datamill.secrets import read_secret_env
from datamill.step import Step, StepConfig


class EmitConfig(StepConfig):
    n: int = 3
    """How many rows to write."""
    label: str = "x"
    api_key_env: Optional[str] = None
    """Env var holding a key; read at run time."""
    token: Optional[str] = None
    """A literal secret-looking field (must never be logged)."""
    model: Optional[str] = None
    """A model name or reference (only checked, never loaded)."""


@register_step
class EmitStep(Step):
    """Write n rows (tests)."""

    kind = "emit"
    Config = EmitConfig

    def model_refs(self):
        return [(("model",), self.config.model)] if self.config.model else []

    def run(self, ctx) -> None:
        import polars as pl

        secret = read_secret_env(self.config.api_key_env) if self.config.api_key_env else ""
        ctx.write(pl.DataFrame({"i": list(range(self.config.n)), "label": self.config.label}))
        ctx.stats["used_key"] = bool(secret)
        ctx.log_metrics({"emitted": self.config.n})


class ExplodeConfig(StepConfig):
    input: str
    after_rows: int = 1


@register_step
class ExplodeStep(Step):
    """Write part of a table, then fail (tests)."""

    kind = "explode"
    Config = ExplodeConfig

    def input_tables(self):
        return [(("input",), self.config.input)]

    def run(self, ctx) -> None:
        df = ctx.read(self.config.input)
        ctx.write(df.head(self.config.after_rows))
        if not os.environ.get("DATAMILL_TEST_DEFUSE"):
            raise RuntimeError("boom after a partial write")


class SleepyConfig(StepConfig):
    input: str
    marker: str
    """A file touched when the step starts (the test kills the process then)."""
    seconds: float = 30


@register_step
class SleepyStep(Step):
    """Start writing, signal, then sleep until killed (tests)."""

    kind = "sleepy"
    Config = SleepyConfig

    def input_tables(self):
        return [(("input",), self.config.input)]

    def run(self, ctx) -> None:
        ctx.write(ctx.read(self.config.input))
        Path(self.config.marker).write_text("started")
        if not os.environ.get("DATAMILL_TEST_DEFUSE"):
            time.sleep(self.config.seconds)


class CountConfig(StepConfig):
    n: int = 3
    """Rows to make."""


@register_step
class CountStep(Step):
    """Make a table of n numbers from nothing (tests the `generator:` form of sources)."""

    kind = "count"
    Config = CountConfig
    source_generator = True

    def run(self, ctx) -> None:
        import polars as pl

        ctx.write(pl.DataFrame({"i": list(range(self.config.n))}))


class ScoredConfig(StepConfig):
    input: str
    acc: float
    """The accuracy it reports (as `demo_task.acc`)."""
    stderr: float | None = None
    """Reported beside it as `acc_stderr`, as lm-eval does."""
    scores: list[float] | None = None
    """Per-example scores (example k is doc k), offered to comparisons; `acc` is then their mean."""
    seed: int | None = None
    """A training seed stand-in: flips the score of example `seed` (a replicate that differs a little)."""


@register_step
class ScoredStep(Step):
    """Copy a table and report an accuracy, the way an evaluate step reports a task (tests)."""

    kind = "scored"
    Config = ScoredConfig
    side_tables = ("scores",)

    def input_tables(self):
        return [(("input",), self.config.input)]

    def comparison_metrics(self, stats: dict) -> dict[str, float]:
        return {f"{task}.{m}": v for task, metrics in stats["tasks"].items() for m, v in metrics.items()
                if not m.endswith("_stderr")}

    def comparison_examples(self, out_dir):
        import numpy as np
        import polars as pl

        from datamill.comparison import ExampleScores

        path = out_dir / "tables" / "scores.parquet"
        if not path.is_file():
            return {}
        table = pl.read_parquet(path)
        return {"demo_task.acc": ExampleScores([str(d) for d in table["doc_id"]], np.asarray(table["score"]))}

    def run(self, ctx) -> None:
        import polars as pl

        ctx.write(ctx.read(self.config.input))
        metrics = {"acc": self.config.acc}
        if self.config.scores is not None:
            scores = list(self.config.scores)
            if self.config.seed is not None:
                scores[self.config.seed] = 1.0 - scores[self.config.seed]
            ctx.write(pl.DataFrame({"doc_id": list(range(len(scores))), "score": scores}), "scores")
            metrics["acc"] = sum(scores) / len(scores)
        if self.config.stderr is not None:
            metrics["acc_stderr"] = self.config.stderr
        ctx.stats["tasks"] = {"demo_task": metrics}
