"""A run's numbers side by side, each with its uncertainty: the one place tables, MLflow and
charts read comparisons from (the statistics are in `datamill.stats`).

A row per sweep point (points that differ only in a `sweep.seeds` value are one row: the mean
over seeds), a column per "<step>.<metric>" of the steps that differ between points
(`Step.comparison_metrics`). A step that is the same in every point but measures what a
differing step measures (the base model evaluated like the fine-tuned ones) adds a reference
row, named after it; the first reference row (else the first point) is the baseline every
other row is tested against, on the same examples.

Where a step offers its per-example scores (`Step.comparison_examples`) a cell gets a bootstrap
interval and a paired test; where it only reports a standard error, a normal interval
(value ± 1.96·stderr) and no test; else neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datamill import stats


@dataclass
class ExampleScores:
    """The per-example values behind one compared metric: `keys` name the examples (the same
    key is the same example in every model's results, e.g. a task's doc id), `statistic` is what
    the metric reports of `values` ("mean" or "median")."""

    keys: list[str]
    values: np.ndarray
    statistic: str = "mean"


@dataclass
class Comparison:
    rows: list[str]
    columns: list[str]
    values: list[list[float | None]]
    references: set[str] = field(default_factory=set)
    intervals: list[list[tuple[float, float] | None]] | None = None  # 95% interval per cell
    tests: list[list[stats.PairedTest | None]] | None = None  # each cell against the baseline's
    p_values: list[list[float | None]] | None = None  # those tests' p, Holm-adjusted within a column
    baseline: str | None = None  # the row every other row is tested against
    seeds: dict[str, int] = field(default_factory=dict)  # row -> seeds averaged (rows with more than one)

    def __post_init__(self):
        blank = [[None] * len(self.columns) for _ in self.rows]
        self.intervals = self.intervals or [list(r) for r in blank]
        self.tests = self.tests or [list(r) for r in blank]
        self.p_values = self.p_values or [list(r) for r in blank]

    def significant(self, i: int, j: int) -> bool:
        p = self.p_values[i][j]
        return p is not None and p < stats.ALPHA

    def mark(self, i: int, j: int) -> str:
        """"**" for an adjusted p below 0.01, "*" below 0.05, "" otherwise."""
        p = self.p_values[i][j]
        return "" if p is None or p >= stats.ALPHA else ("**" if p < 0.01 else "*")

    def has_intervals(self) -> bool:
        return any(c is not None for row in self.intervals for c in row)

    def has_tests(self) -> bool:
        return any(t is not None for row in self.tests for t in row)

    def table_columns(self) -> dict[str, list]:
        """The comparison as named columns (MLflow's comparison table): per metric its value,
        interval, and p-value against the baseline."""
        out: dict[str, list] = {"point": list(self.rows)}
        for j, column in enumerate(self.columns):
            out[column] = [row[j] for row in self.values]
            out[f"{column} ci_low"] = [c[0] if c else None for c in (row[j] for row in self.intervals)]
            out[f"{column} ci_high"] = [c[1] if c else None for c in (row[j] for row in self.intervals)]
            if any(row[j] is not None for row in self.tests):
                out[f"{column} p_vs_{self.baseline}"] = [row[j] for row in self.p_values]
        return out


@dataclass
class _Measured:
    """One step's compared numbers in one point."""

    key: str
    metrics: dict[str, float]
    stderrs: dict[str, float]
    examples: dict[str, ExampleScores]


def comparison(result) -> Comparison:
    """The comparison of a `RunResult` (one point or a sweep)."""
    ws = result.workspace
    measured: list[dict[str, _Measured]] = []
    for point in result.points:
        steps = {}
        for planned in point.plan.steps:
            record = point.steps.get(planned.name)
            metrics = planned.step.comparison_metrics(record.stats) if record is not None else {}
            if metrics:
                folder = ws.step_dir(record.key)
                examples = planned.step.comparison_examples(folder) if folder.is_dir() else {}
                errors = {m: stderr_of(record.stats, m) for m in metrics}
                steps[planned.name] = _Measured(planned.key, metrics, {m: e for m, e in errors.items() if e is not None},
                                                {m: e for m, e in examples.items() if m in metrics})
        measured.append(steps)
    names = list(dict.fromkeys(name for steps in measured for name in steps))
    shared = [name for name in names if len(measured) > 1 and all(name in steps for steps in measured)
              and len({steps[name].key for steps in measured}) == 1]
    varying = [name for name in names if name not in shared]

    # rows: (label, {column: [per-seed (value, stderr, examples)]})
    groups = _seed_groups(result)
    rows: list[tuple[str, dict[str, list[tuple]]]] = []
    for label, members in groups:
        cells: dict[str, list[tuple]] = {}
        for i in members:
            for name in (n for n in varying if n in measured[i]):
                m = measured[i][name]
                for metric in sorted(m.metrics):
                    cells.setdefault(f"{name}.{metric}", []).append(
                        (m.metrics[metric], m.stderrs.get(metric), m.examples.get(metric)))
        rows.append((label, cells))
    columns = list(dict.fromkeys(c for _, cells in rows for c in cells))
    references = set()
    for name in shared:
        m = measured[0][name]
        same = [(f"{other}.{metric}", metric) for other in varying for metric in m.metrics if f"{other}.{metric}" in columns]
        if same:
            rows.append((name, {c: [(m.metrics[metric], m.stderrs.get(metric), m.examples.get(metric))]
                                for c, metric in same}))
            references.add(name)

    values, intervals, scores = [], [], []  # scores: per cell, the per-example values for tests
    for _, cells in rows:
        v_row, i_row, s_row = [], [], []
        for column in columns:
            value, band, per_example = _cell(cells.get(column))
            v_row.append(value)
            i_row.append(band)
            s_row.append(per_example)
        values.append(v_row)
        intervals.append(i_row)
        scores.append(s_row)

    labels = [label for label, _ in rows]
    baseline = next((label for label in labels if label in references), labels[0] if len(labels) > 1 else None)
    tests = [[None] * len(columns) for _ in rows]
    p_values = [[None] * len(columns) for _ in rows]
    if baseline is not None:
        b = labels.index(baseline)
        for j in range(len(columns)):
            for i in range(len(rows)):
                if i != b:
                    tests[i][j] = _paired(scores[b][j], scores[i][j])
            adjusted = stats.holm([t.p_value if t is not None else None for t in (row[j] for row in tests)])
            for i in range(len(rows)):
                p_values[i][j] = adjusted[i]
    seeds = {label: len(members) for (label, members) in groups if len(members) > 1}
    return Comparison(labels, columns, values, references, intervals, tests, p_values,
                      baseline if any(t is not None for row in tests for t in row) else None, seeds)


def _seed_groups(result) -> list[tuple[str, list[int]]]:
    """Points that differ only in their `sweep.seeds` values, as (label, point indices)."""
    from datamill.spec import point_labels

    keys, order = {}, []
    for i, point in enumerate(result.points):
        seed_keys = set(point.plan.resolved.seed_keys)
        rest = {k: v for k, v in point.point.items() if k not in seed_keys}
        if not seed_keys:  # nothing to average: every point its own row
            order.append((point.label or point.run_id, [i]))
            continue
        ident = repr(sorted((str(k), repr(v)) for k, v in rest.items()))
        if ident not in keys:
            keys[ident] = (rest, [])
            order.append(ident)
        keys[ident][1].append(i)
    if all(isinstance(o, tuple) for o in order):
        return order
    labels = point_labels([keys[o][0] for o in order]) if len(order) > 1 else [""]
    return [(label or "all seeds", keys[o][1]) for o, label in zip(order, labels)]


def _cell(seeds: list[tuple] | None):
    """(value, interval, per-example values keyed) of one row's column over its seeds."""
    if not seeds:
        return None, None, None
    examples = [e for _, _, e in seeds]
    if all(e is not None and len(e.keys) for e in examples):
        common = set(examples[0].keys).intersection(*(e.keys for e in examples[1:]))
        keys = [k for k in examples[0].keys if k in common]
        if keys:
            matrix = np.array([_aligned(e, keys) for e in examples])
            statistic = examples[0].statistic
            if len(seeds) == 1:
                value = seeds[0][0] if len(keys) == len(examples[0].keys) else stats.estimate(matrix[0], statistic)
                return value, stats.interval(matrix[0], statistic), ExampleScores(keys, matrix[0], statistic)
            value, low, high = stats.seeds_interval(matrix, statistic)
            return value, (low, high), ExampleScores(keys, matrix.mean(axis=0), statistic)
    value = float(np.mean([v for v, _, _ in seeds]))
    if len(seeds) == 1 and seeds[0][1] is not None:
        return value, (value - 1.96 * seeds[0][1], value + 1.96 * seeds[0][1]), None
    return value, None, None


def _aligned(scores: ExampleScores, keys: list[str]) -> np.ndarray:
    where = {k: i for i, k in enumerate(scores.keys)}
    return np.asarray(scores.values, dtype=float)[[where[k] for k in keys]]


def _paired(base: ExampleScores | None, other: ExampleScores | None) -> stats.PairedTest | None:
    """The paired test of `other` against `base` when both were scored on the same examples."""
    if base is None or other is None or set(base.keys) != set(other.keys) or base.statistic != other.statistic:
        return None
    return stats.paired_test(_aligned(base, base.keys), _aligned(other, base.keys), base.statistic)


def stderr_of(step_stats: dict, metric: str) -> float | None:
    """The standard error a step's stats hold beside one of its compared metrics: the metric's
    `<name>_stderr` sibling (lm-eval's), at any depth: "datamill_capitals_mc.acc" is found as
    stats["tasks"]["datamill_capitals_mc"]["acc"], its error as [...]["acc_stderr"]. None when
    there is none, more than one, or it is not a finite number."""
    import math
    import numbers

    *path, leaf = metric.split(".")
    found, nodes = [], [step_stats]
    while nodes:
        node = nodes.pop()
        here = node
        for part in path:
            here = here.get(part) if isinstance(here, dict) else None
        if isinstance(here, dict) and leaf in here and f"{leaf}_stderr" in here:
            found.append(here[f"{leaf}_stderr"])
        nodes += [v for v in node.values() if isinstance(v, dict)]
    if len(found) != 1 or not isinstance(found[0], numbers.Real) or isinstance(found[0], bool):
        return None
    return float(found[0]) if math.isfinite(found[0]) else None


def log_comparison(result, tracker, parent: str) -> None:
    """A sweep's points side by side on its parent run: each value, its interval and its p-value
    against the baseline as metrics, a table, a heatmap (comparison.png) and a bar chart per
    metric with 95% error bars (comparison_bars.png)."""
    table = comparison(result)
    if not table.columns:
        return
    # "<step>.<metric>/<point>": MLflow lists a run's metrics by name, so each metric's values
    # for every point (and reference row) read together, and the UI's charts group by the part
    # before the "/". The tracker makes the point's label a valid key ("method=less,model=smol"
    # -> "method_less_model_smol").
    metrics = {}
    for i, row in enumerate(table.rows):
        for j, column in enumerate(table.columns):
            if table.values[i][j] is None:
                continue
            metrics[f"{column}/{row}"] = table.values[i][j]
            if table.intervals[i][j] is not None:
                metrics[f"{column}.ci_low/{row}"], metrics[f"{column}.ci_high/{row}"] = table.intervals[i][j]
            if table.p_values[i][j] is not None:
                metrics[f"{column}.p_value/{row}"] = table.p_values[i][j]
    tracker.log_metrics(parent, {k: v for k, v in metrics.items() if v is not None and np.isfinite(v)})
    tracker.log_table(parent, "comparison", table.table_columns())
    from datamill.plots import bars, heatmap

    folder = Path(result.workspace.steps_dir) / ".tmp" / f"comparison-{parent}"  # cleaned on the next run
    folder.mkdir(parents=True, exist_ok=True)
    points = len(table.rows) - len(table.references)
    heatmap(folder / "comparison.png", table.rows, table.columns, table.values, title=f"{points} sweep points")
    notes = [f"grey: {', '.join(sorted(table.references))}"] if table.references else []
    if table.baseline:
        notes.append(f"* / ** p < 0.05 / 0.01 vs {table.baseline}, paired, Holm-adjusted")
    marks = [[table.mark(i, j) for j in range(len(table.columns))] for i in range(len(table.rows))]
    bars(folder / "comparison_bars.png", table.rows, table.columns, table.values, intervals=table.intervals,
         marks=marks, muted=table.references,
         title=f"{points} sweep points" + (f" ({'; '.join(notes)})" if notes else ""))
    tracker.log_artifact(parent, folder / "comparison.png", "comparison")
    tracker.log_artifact(parent, folder / "comparison_bars.png", "comparison")
