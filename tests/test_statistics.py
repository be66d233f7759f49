"""Uncertainty on every compared number: bootstrap intervals that cover what they claim, paired
tests that find a planted difference and leave identical models alone, Holm's adjustment, seeds
averaged into one row, and the tables, MLflow metrics and CLI output that carry them."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import datamill
from datamill import stats
from datamill.comparison import comparison
from datamill.errors import SpecError
from datamill.spec import load_spec

RNG = np.random.default_rng(20261203)


def test_a_95_percent_interval_covers_a_known_rate_in_93_to_97_percent_of_400_draws():
    rate, n = 0.45, 200  # a rate and size away from the edges, where any 0/1 interval is lumpy
    covered = 0
    for draw in range(400):
        scores = (RNG.random(n) < rate).astype(float)
        low, high = stats.interval(scores, seed=draw)
        covered += low <= rate <= high
    assert 0.93 <= covered / 400 <= 0.97, covered / 400


def test_the_interval_of_a_median_covers_the_true_median_too():
    covered = 0
    for draw in range(200):
        low, high = stats.interval(RNG.exponential(size=80), "median", seed=draw)
        covered += low <= np.log(2) <= high
    assert 0.90 <= covered / 200 <= 0.99, covered / 200


def test_intervals_are_seeded_and_degenerate_samples_give_a_point():
    scores = (RNG.random(50) < 0.5).astype(float)
    assert stats.interval(scores) == stats.interval(scores)
    assert stats.interval([1.0] * 20) == (1.0, 1.0)
    assert stats.interval([]) != stats.interval([])  # nan: nothing to say


def test_mcnemar_finds_a_planted_difference_and_not_one_between_identical_models():
    base = (RNG.random(200) < 0.4).astype(float)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:30]] = 1  # 30 more questions right, none lost
    found = stats.paired_test(base, better)
    assert found.test == "mcnemar" and found.p_value < 0.001
    assert found.difference == pytest.approx(30 / 200) and found.low > 0
    same = stats.paired_test(base, base.copy())
    assert same.p_value == 1.0 and same.difference == 0.0
    # as many won as lost: no difference either
    swapped = base.copy()
    swapped[np.flatnonzero(base == 0)[:10]] = 1
    swapped[np.flatnonzero(base == 1)[:10]] = 0
    assert stats.paired_test(base, swapped).p_value == 1.0


def test_the_permutation_test_pairs_continuous_scores_by_example():
    base = RNG.normal(size=60)
    shifted = base + 0.3 + RNG.normal(scale=0.1, size=60)
    found = stats.paired_test(base, shifted)
    assert found.test == "permutation" and found.p_value < 0.001 and found.low > 0
    # an unpaired test would miss it: the shift is small next to the spread between examples
    noise = base + RNG.normal(scale=0.5, size=60)
    assert stats.paired_test(base, noise).p_value > 0.01


def test_holm_adjusts_several_points_against_one_reference():
    assert stats.holm([0.01, 0.04, None, 0.03]) == [pytest.approx(0.03), pytest.approx(0.06), None, pytest.approx(0.06)]
    assert stats.holm([0.5]) == [0.5]


def test_seeds_average_with_an_interval_over_seeds_and_examples():
    per_seed = np.stack([(RNG.random(100) < p).astype(float) for p in (0.40, 0.45, 0.50)])
    value, low, high = stats.seeds_interval(per_seed)
    assert value == pytest.approx(per_seed.mean())
    one_seed_low, one_seed_high = stats.interval(per_seed[0])
    assert low < value < high and (high - low) > 0.5 * (one_seed_high - one_seed_low)


SWEEP = """\
name: scoring
sources:
  nums: {generator: count, n: 4}
steps:
  base: {scored: {input: nums, acc: 0, scores: %(base)s}}
  score: {scored: {input: nums, acc: 0, scores: %(base)s}}
sweep:
  mode: zip
  steps.score.scored.scores: [%(same)s, %(better)s, %(worse)s]
%(seeds)s"""


def _scores(n: int = 120):
    base = (RNG.random(n) < 0.4).astype(int)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:25]] = 1
    worse = base.copy()
    worse[np.flatnonzero(base == 1)[:3]] = 0
    return {"base": json.dumps(base.tolist()), "same": json.dumps(base.tolist()),
            "better": json.dumps(better.tolist()), "worse": json.dumps(worse.tolist())}


def test_a_sweep_compares_each_point_with_the_base_row_on_the_same_examples(write_spec):
    import mlflow

    scores = _scores()
    result = datamill.run(write_spec(SWEEP % {**scores, "seeds": ""}))
    compared = comparison(result)
    assert compared.rows[-1] == "base" and compared.baseline == "base"
    assert compared.columns == ["score.demo_task.acc"]
    same, better, worse, base = (row[0] for row in compared.tests)
    assert base is None  # the baseline is not tested against itself
    assert same.p_value == 1.0 and not compared.significant(0, 0)
    assert better.p_value < 1e-4 and compared.mark(1, 0) == "**"
    assert worse.p_value > 0.05 and compared.mark(2, 0) == ""  # 3 of 120 lost: not a finding
    for i, (value, band) in enumerate(zip(compared.values, compared.intervals)):
        assert band[0][0] <= value[0] <= band[0][1]

    parent = mlflow.MlflowClient(tracking_uri=result.tracking_location).get_run(result.run_id).data.metrics
    p_values = {k: v for k, v in parent.items() if k.startswith("score.demo_task.acc.p_value/")}
    assert len(p_values) == 3 and sorted(p_values.values())[0] < 1e-4
    assert sum(k.startswith("score.demo_task.acc.ci_low/") for k in parent) == 4


def test_the_cli_prints_intervals_significance_marks_and_the_paired_tests(write_spec, monkeypatch, capsys):
    from datamill.cli import main

    path = write_spec(SWEEP % {**_scores(), "seeds": ""})
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys, "argv", ["datamill", "run", str(path)])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert not stopped.value.code
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "base (ref)" in text and "±" in text and "**" in text
    assert "paired tests against base" in text and "mcnemar" in text and "Holm-adjusted" in text


def test_sweep_seeds_make_one_row_per_point_averaged_over_seeds(write_spec):
    scores = _scores(60)
    seeds = "  seeds: {steps.score.scored.seed: [0, 1, 2]}\n"
    loaded = load_spec(write_spec(SWEEP % {**scores, "seeds": seeds}))
    points = loaded.points()
    assert len(points) == 9 and points[0].seed_keys == ("steps.score.scored.seed",)
    result = datamill.run(loaded.path)
    compared = comparison(result)
    assert len(compared.rows) == 4 and compared.rows[-1] == "base"
    assert set(compared.seeds.values()) == {3}
    # each row: the mean over its three seeds; the seeds flip examples 0, 1 and 2
    per_seed = [p for p in result.points if p.point["steps.score.scored.seed"] in (0, 1, 2)]
    means = [p.steps["score"].stats["tasks"]["demo_task"]["acc"] for p in per_seed[:3]]
    assert compared.values[0][0] == pytest.approx(np.mean(means))
    assert compared.tests[1][0].p_value < 0.001  # "better" over seeds still beats base


@pytest.mark.parametrize("seeds, message", [
    ("[0, 1]", "expected a mapping of dotted paths"),
    ("{steps.score.scored.seed: []}", "non-empty list of seeds"),
    ("{steps.score.scored.seed: [0, 1], steps.base.scored.seed: [0]}", "equal length"),
    ("{steps.score.scored.scores: [[1], [0]]}", "sweep it in one place"),
])
def test_bad_sweep_seeds_are_spec_errors(write_spec, seeds, message):
    path = write_spec(SWEEP % {**_scores(10), "seeds": f"  seeds: {seeds}\n"})
    with pytest.raises(SpecError, match=message):
        load_spec(path).points()
