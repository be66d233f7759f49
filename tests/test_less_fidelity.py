"""LESS fidelity to the reference (princeton-nlp/LESS): checkpoint weights from the learning rates
each epoch actually trained with, and the grouped (per-subtask) aggregation of matching.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import torch  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from datamill.models import resolve_model

    return resolve_model("builtin:tiny-llama", base_dir=Path("."), cache_dir=tmp_path_factory.mktemp("models"))


# --------------------------------------------------------------------------- checkpoint weights


def test_one_step_per_epoch_gives_every_checkpoint_the_lr_of_its_step(tiny, tmp_path):
    """LESS's warmup (linear schedule, warmup 0.03) with one optimizer step per epoch: epoch k's
    weight is the rate its step was taken with, lr * (1 - k/4); none is 0 (the rate logged after
    the scheduler step would give the last checkpoint 0)."""
    from datamill.registry import function
    from selection.less import less_scores
    from selection.less_method import _warmup

    convs = [[{"role": "user", "content": f"What is {a} + {a}?"}, {"role": "assistant", "content": str(2 * a)}]
             for a in range(4)]
    lr = 1e-3
    states = _warmup(function("fine_tune"), tiny, convs, "assistant", tmp_path, {"r": 4, "alpha": 8,
                     "targets": ["q_proj", "v_proj"]}, seed=0, fraction=1.0, minimum=4, epochs=4, lr=lr,
                     max_len=64, batch_size=4)
    assert [s["epoch"] for s in states] == [1, 2, 3, 4]
    assert [s["step"] for s in states] == [1, 2, 3, 4]  # one optimizer step per epoch
    rates = [s["mean_lr"] for s in states]
    assert rates == pytest.approx([lr, 0.75 * lr, 0.5 * lr, 0.25 * lr], rel=1e-6)
    # each checkpoint's features count in proportion to its rate
    eye = np.eye(4)
    per_ckpt = [eye[[k]] for k in range(4)]  # checkpoint k says "candidate k"
    scores = less_scores([eye] * 4, per_ckpt, rates)
    assert scores == pytest.approx(np.array(rates) / sum(rates))
    assert (scores > 0).all()


# --------------------------------------------------------------------------- grouped aggregation


def _unit(*xs):
    v = np.asarray(xs, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_subtask_aggregation_lets_a_candidate_of_a_small_subtask_win():
    from selection.less import less_scores

    # four targets of a big subtask along e1, one of a small subtask along e2 (not contiguous)
    targets = np.stack([_unit(1, 0), _unit(1, 0), _unit(0, 1), _unit(1, 0), _unit(1, 0)])
    groups = ["big", "big", "small", "big", "big"]
    candidates = np.stack([_unit(0.8, 0.6), _unit(0, 1)])  # 0: fair for big; 1: exactly the small subtask
    mean = less_scores([candidates], [targets], [1.0], aggregate="mean")
    grouped = less_scores([candidates], [targets], [1.0], aggregate="subtask", groups=groups)
    assert mean == pytest.approx([0.76, 0.2]) and mean[0] > mean[1]
    assert grouped == pytest.approx([0.8, 1.0]) and grouped[1] > grouped[0]


def test_subtask_aggregation_matches_the_reference_reshape_and_ignores_target_order():
    from selection.less import less_scores

    rng = np.random.default_rng(0)
    n_sub, per = 3, 4  # the reference's layout: subtasks contiguous, equal counts
    cands = [rng.normal(size=(7, 16)) for _ in range(2)]
    targs = [rng.normal(size=(n_sub * per, 16)) for _ in range(2)]
    lrs = [2.0, 1.0]
    groups = [f"s{j // per}" for j in range(n_sub * per)]
    total = sum(w * c @ t.T for w, c, t in zip(np.array(lrs) / 3, cands, targs))
    reference = total.reshape(7, n_sub, -1).mean(-1).max(-1)
    assert less_scores(cands, targs, lrs, "subtask", groups) == pytest.approx(reference)
    order = rng.permutation(n_sub * per)  # shuffled targets, grouped by label
    shuffled = less_scores(cands, [t[order] for t in targs], lrs, "subtask", [groups[j] for j in order])
    assert shuffled == pytest.approx(reference)
    with pytest.raises(ValueError, match="one subtask label per target"):
        less_scores(cands, targs, lrs, "subtask", groups[:-1])
    with pytest.raises(ValueError, match="aggregate"):
        less_scores(cands, targs, lrs, "median")


@pytest.mark.parametrize(("params", "message"), [
    ({"aggregate": "subtask"}, r"group_column: aggregate: subtask needs group_column"),
    ({"aggregate": "subtask", "group_column": "subject"}, r"group_column: the target table has no column 'subject'"),
    ({"group_column": "family"}, r"group_column: only used with aggregate: subtask"),
    ({"aggregate": "mode"}, r"aggregate: expected one of mean, max, subtask"),
])
def test_bad_grouping_settings_fail_before_any_training(tmp_path, params, message):
    import polars as pl

    from selection.less_method import run_less

    targets = pl.DataFrame({"text": ["a", "b"], "family": ["x", "y"]})
    with pytest.raises(ValueError, match=message):
        run_less(["c"], ["a", "b"], rows=None, target_rows=targets, model_dir=tmp_path / "never-read",
                 cache_dir=tmp_path, **params)
    assert not (tmp_path / "less").exists()  # nothing was computed


def test_missing_group_values_are_a_clear_error(tmp_path):
    import polars as pl

    from selection.less_method import run_less

    targets = pl.DataFrame({"text": ["a", "b"], "family": ["x", None]})
    with pytest.raises(ValueError, match=r"group_column: 1 target rows have no value in 'family'"):
        run_less(["c"], ["a", "b"], rows=None, target_rows=targets, model_dir=tmp_path, cache_dir=tmp_path,
                 aggregate="subtask", group_column="family")


def test_a_bad_group_column_in_a_spec_fails_the_select_step_naming_the_field(write_spec, tiny, monkeypatch):
    from datamill.api import run
    from datamill.errors import StepFailed

    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(tiny.parent))
    spec = write_spec("""
name: less_groups
models: {tiny: builtin:tiny-llama}
sources:
  pool: {generator: tasks, families: [arithmetic, chat], n: 20, seed: 0}
  target: {generator: tasks, families: [arithmetic, capitals], n: 6, seed: 1}
steps:
  pick: {select: {input: pool, target: target, method: less, budget: 5, model: tiny,
                  params: {aggregate: subtask, group_column: subject}}}
tracking: {enabled: false}
""")
    with pytest.raises(StepFailed, match=r"group_column: the target table has no column 'subject'.*family"):
        run(spec)
