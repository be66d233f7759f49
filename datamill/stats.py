"""The statistics behind every number datamill compares: intervals over examples, paired tests
between two models on the same examples, and aggregation over training seeds.

    low, high = interval(scores)                         # 95% bootstrap CI of the mean
    test = paired_test(base_scores, tuned_scores)        # McNemar (0/1 scores) or a permutation test
    adjusted = holm([t.p_value for t in tests])          # several points against one reference

All of it is seeded: the same scores give the same interval and p-value on every machine.

- Intervals: scipy's BCa bootstrap over examples (2,000 resamples), of the statistic the metric
  reports (the mean; BYOD's word order reports a median). BCa corrects the percentile bootstrap's
  bias and skew, which matters for accuracies near 0 or 1 on a few dozen questions.
- Paired tests compare two models on the examples both were scored on. Exact-match and accuracy
  scores (all 0 or 1) get McNemar's exact test: only the examples where the two disagree carry
  information, and under "no difference" each disagreement goes either way with probability 1/2.
  Other scores get a paired permutation test (each example's two scores swapped at random), of
  the difference of the statistic. Two identical models get p = 1.
- Several points against one reference are adjusted with Holm's method, so "significant" holds
  for the table as a whole (family-wise error 5%), not for each cell on its own.
- Seeds: a point run with several training seeds reports the mean over seeds of the statistic,
  and a two-level bootstrap interval (seeds resampled, then examples), so it reflects both how
  much another seed would move the number and how much other questions would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
PERMUTATIONS = 9999
SEED = 0
ALPHA = 0.05
STATISTICS = ("mean", "median")


def _statistic(name: str):
    if name not in STATISTICS:
        raise ValueError(f"unknown statistic {name!r}: expected one of {', '.join(STATISTICS)}")
    return np.mean if name == "mean" else np.median


def estimate(values, statistic: str = "mean") -> float:
    values = np.asarray(values, dtype=float)
    return float(_statistic(statistic)(values)) if values.size else float("nan")


def interval(values, statistic: str = "mean", *, confidence: float = CONFIDENCE, seed: int = SEED) -> tuple[float, float]:
    """The `confidence` bootstrap interval (BCa) of `statistic` over these per-example values.
    (nan, nan) for no values; a point for one value or values all equal."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    if values.size == 1 or np.all(values == values[0]):
        return float(values[0]), float(values[0])
    fn = _statistic(statistic)
    result = bootstrap((values,), fn, n_resamples=RESAMPLES, confidence_level=confidence, method="BCa",
                       rng=np.random.default_rng(seed), vectorized=True, axis=-1)
    low, high = result.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):  # BCa undefined (e.g. one odd value): percentile
        result = bootstrap((values,), fn, n_resamples=RESAMPLES, confidence_level=confidence,
                           method="percentile", rng=np.random.default_rng(seed), vectorized=True, axis=-1)
        low, high = result.confidence_interval
    return float(low), float(high)


def is_binary(values) -> bool:
    values = np.asarray(values, dtype=float)
    return bool(values.size) and bool(np.all((values == 0) | (values == 1)))


@dataclass
class PairedTest:
    """Model b against model a on the same n examples: b's statistic minus a's, its interval, the
    test's p-value, and which test ("mcnemar" or "permutation")."""

    n: int
    difference: float
    low: float
    high: float
    p_value: float
    test: str


def paired_test(a, b, statistic: str = "mean", *, confidence: float = CONFIDENCE, seed: int = SEED) -> PairedTest:
    """Is b different from a? `a` and `b` hold the two models' scores on the same examples, in
    the same order. McNemar's exact test when every score is 0 or 1, else a paired permutation
    test; the interval of the difference is a paired BCa bootstrap."""
    from scipy.stats import binomtest, bootstrap, permutation_test

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must match one to one: {a.size} vs {b.size}")
    fn = _statistic(statistic)
    n = int(a.size)
    if n == 0:
        return PairedTest(0, float("nan"), float("nan"), float("nan"), float("nan"), "none")
    difference = float(fn(b) - fn(a))

    def diff(x, y, axis=-1):
        return fn(y, axis=axis) - fn(x, axis=axis)

    if np.array_equal(a, b):
        return PairedTest(n, 0.0, 0.0, 0.0, 1.0, "mcnemar" if is_binary(a) else "permutation")
    if n == 1 or np.all(b - a == (b - a)[0]):
        low = high = difference
    else:
        ci = bootstrap((a, b), diff, paired=True, n_resamples=RESAMPLES, confidence_level=confidence,
                       method="BCa", rng=np.random.default_rng(seed), vectorized=True, axis=-1).confidence_interval
        if not (np.isfinite(ci.low) and np.isfinite(ci.high)):
            ci = bootstrap((a, b), diff, paired=True, n_resamples=RESAMPLES, confidence_level=confidence,
                           method="percentile", rng=np.random.default_rng(seed), vectorized=True,
                           axis=-1).confidence_interval
        low, high = float(ci.low), float(ci.high)
    if statistic == "mean" and is_binary(a) and is_binary(b):
        only_b = int(np.sum((a == 0) & (b == 1)))
        only_a = int(np.sum((a == 1) & (b == 0)))
        p = binomtest(only_b, only_a + only_b, 0.5).pvalue
        return PairedTest(n, difference, low, high, float(p), "mcnemar")
    result = permutation_test((a, b), diff, permutation_type="samples", n_resamples=PERMUTATIONS,
                              alternative="two-sided", vectorized=True, axis=-1, rng=np.random.default_rng(seed))
    return PairedTest(n, difference, low, high, float(result.pvalue), "permutation")


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of several tests' p-values (None stays None): reject the
    smallest at alpha/m, the next at alpha/(m-1), ...; adjusted values are monotone and <= 1."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if p is not None and np.isfinite(p))
    m = len(indexed)
    adjusted: list[float | None] = [None if p is None else float("nan") for p in p_values]
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def seeds_interval(values_by_seed, statistic: str = "mean", *, confidence: float = CONFIDENCE,
                   seed: int = SEED) -> tuple[float, float, float]:
    """(estimate, low, high) of a point run with several seeds: `values_by_seed` is seeds x
    examples (the same examples in every row). The estimate is the mean over seeds of each
    seed's statistic; the interval a two-level bootstrap: seeds drawn with replacement, then
    examples (the same draw for every seed, as the examples are shared)."""
    values = np.asarray(values_by_seed, dtype=float)
    if values.ndim != 2 or values.size == 0:
        raise ValueError("values_by_seed must be a non-empty seeds x examples array")
    fn = _statistic(statistic)
    point = float(np.mean(fn(values, axis=1)))
    seeds, n = values.shape
    rng = np.random.default_rng(seed)
    draws = np.empty(RESAMPLES)
    for r in range(RESAMPLES):
        rows = values[rng.integers(0, seeds, seeds)][:, rng.integers(0, n, n)]
        draws[r] = np.mean(fn(rows, axis=1))
    tail = (1 - confidence) / 2
    return point, float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail))
