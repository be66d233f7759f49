"""The select step and its methods: the testbed with known answers, lineage, errors (ZIP-FIT's kernel: test_zipfit.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datamill.errors import SpecError
from helpers_steps import run_step

FAMILIES = ["arithmetic", "reverse", "sort", "capitals", "units", "code", "chat"]


def make_testbed(write_spec, target: str, method: str, extra: str = "", budget: int = 66):
    """A pool of 6 x 100 rows of other families + 66 of the target family (~10%); the target
    table is 50 rows of that family drawn with another seed."""
    return write_spec(f"""
name: testbed
sources:
  tasks: {{generator: tasks, families: [{', '.join(FAMILIES)}], n: 700, seed: 0}}
  target: {{generator: tasks, families: [{target}], n: 50, seed: 1}}
steps:
  pool:
    sql: |
      SELECT * FROM tasks WHERE family <> '{target}'
      UNION ALL SELECT * FROM (SELECT * FROM tasks WHERE family = '{target}' ORDER BY id LIMIT 66)
  pick:
    select:
      input: pool
      target: target
      method: {method}
      budget: {budget}
{extra}
tracking: {{enabled: false}}
""")


def run(spec):
    from datamill.api import run as dm_run

    return dm_run(spec)


# --------------------------------------------------------------------------- DSIR


def test_dsir_weights_come_back_in_row_order(tmp_path):
    from selection.dsir import dsir_log_weights, dsir_scores

    candidates = [f"what is {i} plus {i + 1}?" if i % 3 else f"the capital of country {i} is city {i}"
                  for i in range(30)]
    targets = ["what is 2 plus 2?", "what is 7 plus 1?"]
    one, lengths = dsir_log_weights(candidates, targets, tmp_path / "a")
    assert (one[[i for i in range(30) if i % 3]] > one[0]).all()  # an arithmetic row outweighs a capitals row
    assert lengths[0] == len("the capital of country 0 is city 0".split())
    top = dsir_scores(candidates, targets, tmp_path / "c", top_k=True)
    np.testing.assert_array_equal(top, one)
    a = dsir_scores(candidates, targets, tmp_path / "d", seed=1)
    b = dsir_scores(candidates, targets, tmp_path / "e", seed=1)
    np.testing.assert_array_equal(a, b)  # resampling noise comes from the seed
    assert not np.array_equal(a, one)


# --------------------------------------------------------------------------- the testbed


@pytest.mark.parametrize("method, params", [("zipfit", ""), ("zipfit", "{mode: fast}"), ("dsir", "")])
@pytest.mark.parametrize("family", ["arithmetic", "capitals", "code"])
def test_target_aware_methods_find_the_target_family(write_spec, family, method, params):
    result = run(make_testbed(write_spec, family, method, extra=f"      params: {params}\n" if params else ""))
    stats = result.points[-1].steps["pick"].stats
    assert stats["target_family"] == family
    assert stats["target_family_precision"] >= 0.8, stats


@pytest.mark.parametrize("family", ["arithmetic", "capitals", "code"])
def test_random_stays_near_the_base_rate(write_spec, family):
    from datamill.comparison import comparison

    result = run(make_testbed(write_spec, family, "random"))
    assert result.points[-1].steps["pick"].stats["target_family_precision"] < 0.3  # base rate 0.1
    # the precision is a share of the picked rows: its interval is a bootstrap over them
    compared = comparison(result)
    j = compared.columns.index("pick.target_family_precision")
    low, high = compared.intervals[0][j]
    assert low <= compared.values[0][j] <= high and high - low > 0.05


def test_scores_table_is_every_selection_decision(write_spec):
    result = run(make_testbed(write_spec, "units", "zipfit"))
    pool, picked, scores = result.table("pool"), result.table("pick"), result.table("pick__scores")
    assert scores.height == pool.height and sorted(scores["id"].to_list()) == sorted(pool["id"].to_list())
    assert sorted(scores["rank"].to_list()) == list(range(1, pool.height + 1))
    assert scores["selected"].sum() == picked.height == 66
    top = scores.sort("rank").head(66)
    assert set(top["id"].to_list()) == set(picked["id"].to_list())
    assert picked["select_rank"].to_list() == sorted(picked["select_rank"].to_list())  # rank order
    assert (picked["select_score"].to_numpy() >= scores.filter(~scores["selected"])["score"].max()).all()


def test_per_family_caps_and_fractional_budgets(write_spec):
    result = run(make_testbed(write_spec, "units", "length", budget=0.3, extra="      per_family: 40\n"))
    picked = result.table("pick")
    assert picked.height == round(0.3 * 666)
    assert picked.group_by("family").len()["len"].max() <= 40
    # caps that run out before the budget: fewer rows, and the stats say so
    result = run(make_testbed(write_spec, "units", "length", budget=0.3, extra="      per_family: 20\n"))
    stats = result.points[-1].steps["pick"].stats
    assert stats["selected"] == 7 * 20 and stats["budget_clipped"] is True


def test_budget_larger_than_the_pool_keeps_everything_and_says_so(write_spec):
    result = run(make_testbed(write_spec, "units", "random", budget=10_000))
    stats = result.points[-1].steps["pick"].stats
    assert stats["budget_clipped"] is True and stats["selected"] == 666


def test_empty_target_is_a_clear_error(write_spec):
    from datamill.errors import StepFailed

    spec = make_testbed(write_spec, "units", "zipfit")
    spec.write_text(spec.read_text().replace("target: {generator: tasks, families: [units], n: 50, seed: 1}",
                                             "target: {path: empty.jsonl, allow_empty: true}"))
    (spec.parent / "empty.jsonl").write_text("")
    with pytest.raises(StepFailed, match="target table 'target' is empty"):
        run(spec)


def test_empty_candidate_text_gets_a_score(tmp_path):
    import polars as pl

    from selection.select_step import SelectStep

    rows = pl.DataFrame({"id": ["a", "b", "c"], "text": ["what is 1 + 1?", "", "the sky is blue"]})
    target = pl.DataFrame({"text": ["what is 2 + 2?"]})
    _, tables = run_step(SelectStep, {"input": "rows", "target": "target", "budget": 1}, tmp_path,
                         inputs={"rows": rows, "target": target})
    assert tables["main"]["id"].to_list() == ["a"]
    assert np.isfinite(tables["scores"]["score"].to_numpy()).all()


def test_streamed_candidates_give_the_same_selection_as_the_whole_table(tmp_path, monkeypatch):
    """A method that does not ask for `rows` reads the candidates a batch at a time (tiny batches
    here); one that does gets the table whole: the selection, ranks and order are the same."""
    import polars as pl

    import datamill.step
    from selection.methods import _selectors, register_selector
    from selection.select_step import SelectStep

    rows = pl.DataFrame({"id": [f"r{i}" for i in range(50)],
                         "text": [f"what is {i} plus {i % 7}?" if i % 3 else f"the capital {i} is city {i}"
                                  for i in range(50)],
                         "family": ["arithmetic" if i % 3 else "capitals" for i in range(50)],
                         "extra": list(range(50))})
    target = pl.DataFrame({"text": ["what is 2 plus 2?", "what is 5 plus 1?"], "family": ["arithmetic"] * 2})

    @register_selector("zipfit_with_rows")
    def zipfit_with_rows(candidates, targets, rows):
        from selection.zipfit import zipfit_scores

        assert rows.height == len(candidates)
        return zipfit_scores(candidates, targets, workers=1)

    monkeypatch.setattr(datamill.step, "BATCH_ROWS", 7)
    config = {"input": "rows", "target": "target", "budget": 12, "per_family": 10}
    try:
        _, streamed = run_step(SelectStep, {**config, "method": "zipfit"}, tmp_path / "a",
                               inputs={"rows": rows, "target": target})
        _, whole = run_step(SelectStep, {**config, "method": "zipfit_with_rows"}, tmp_path / "b",
                            inputs={"rows": rows, "target": target})
    finally:
        _selectors.pop("zipfit_with_rows", None)
    assert streamed["main"].equals(whole["main"]) and streamed["scores"].equals(whole["scores"])
    assert streamed["main"].height == 12 and streamed["main"]["select_rank"].is_sorted()
    assert streamed["main"].columns == [*rows.columns, "select_score", "select_rank"]


def test_unknown_method_and_bad_budget_are_spec_errors(write_spec):
    with pytest.raises(SpecError, match="unknown selection method 'zipfti'.*did you mean 'zipfit'"):
        run(make_testbed(write_spec, "units", "zipfti"))
    with pytest.raises(SpecError, match="a fractional budget must be at most 1"):
        run(make_testbed(write_spec, "units", "zipfit", budget=1.5))


def test_a_registered_user_method_is_one_function_and_one_line(write_spec):
    from selection.methods import _selectors, register_selector

    @register_selector("shortest_first")
    def shortest_first(candidates, targets, rows, bonus: float = 0.0):
        assert rows.height == len(candidates)
        return [bonus - len(c) for c in candidates]

    try:
        result = run(make_testbed(write_spec, "units", "shortest_first", budget=5,
                                  extra="      params: {bonus: 1.5}\n"))
        picked = result.table("pick")
        assert picked["select_score"].to_list() == sorted(picked["select_score"].to_list(), reverse=True)
        lengths = sorted(len("\n".join(m["content"] for m in ms)) for ms in result.table("pool")["messages"].to_list())
        assert [1.5 - s for s in picked["select_score"].to_list()] == lengths[:5]
    finally:
        _selectors.pop("shortest_first", None)


def test_selection_reaches_mlflow(write_spec):
    from mlflow import MlflowClient

    spec = make_testbed(write_spec, "units", "zipfit")
    spec.write_text(spec.read_text().replace("tracking: {enabled: false}\n", ""))
    result = run(spec)
    client = MlflowClient(tracking_uri=result.tracking_location)
    data = client.get_run(result.run_id).data
    assert data.metrics["pick.selected"] == 66 and data.metrics["pick.target_family_precision"] >= 0.8
    assert data.tags["step.pick.method"] == "zipfit"
    assert "step.pick.seconds.score" in data.tags  # timings are tags: the metrics are results
    assert "pick/scores.png" in [a.path for a in client.list_artifacts(result.run_id, "pick")]


def test_a_method_in_a_module_next_to_the_spec(write_spec):
    spec = make_testbed(write_spec, "units", "my_selectors:by_digits", budget=10)
    module = spec.parent / "my_selectors.py"
    module.write_text("def by_digits(candidates, targets):\n    return [sum(ch.isdigit() for ch in c) for c in candidates]\n")
    first = run(spec).points[-1].steps["pick"]
    assert first.stats["selected"] == 10
    module.write_text("def by_digits(candidates, targets):\n    return [-sum(ch.isdigit() for ch in c) for c in candidates]\n")
    second = run(spec).points[-1].steps["pick"]
    assert second.key != first.key and not second.cached  # editing the module reruns the step
    with pytest.raises(SpecError, match="'nowhere:f' is not allowed: .*'nowhere' is not one of them"):
        run(make_testbed(write_spec, "units", "nowhere:f"))


# --------------------------------------------------------------------------- density


def test_kde_log_density_on_a_2d_toy_with_a_known_answer():
    from selection.density import bandwidth_for, log_density_of

    reference = np.array([[0.0, 0.0]])
    queries = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    h = 0.5
    got = log_density_of(queries, reference, bandwidth=h)
    expected = -np.sum(queries ** 2, axis=1) / (2 * h * h) - 2 * np.log(h * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # two clusters: a query near the big one is more typical than one near the small one
    rng = np.random.default_rng(0)
    data = np.concatenate([rng.normal(0, 0.3, (90, 2)), rng.normal(5, 0.3, (10, 2))])
    near_big, near_small, far = log_density_of(np.array([[0, 0], [5, 5], [10, -10]]), data)
    assert near_big > near_small > far
    assert bandwidth_for(np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 8.0]]), "median") == pytest.approx(5 / np.sqrt(2))
    assert bandwidth_for(data, "scott") > 0 and bandwidth_for(data, 0.2) == 0.2
    with pytest.raises(ValueError, match="bandwidth"):
        bandwidth_for(data, "silverman-ish")


# ~12 s each (the embedder): one family in the default suite, the others in the slow one
@pytest.mark.parametrize("family", [pytest.param("arithmetic", marks=pytest.mark.slow), "capitals",
                                    pytest.param("code", marks=pytest.mark.slow)])
def test_density_finds_the_target_family(write_spec, family):
    result = run(make_testbed(write_spec, family, "density"))
    assert result.points[-1].steps["pick"].stats["target_family_precision"] >= 0.8


def test_log_density_is_offered_to_other_stages():
    from datamill.registry import function

    train = ["What is 2 + 3?", "What is 10 + 7?", "What is 4 + 4?"]
    scores = function("log_density")(["What is 5 + 1?", "The capital of Peru is Lima."], train)
    assert scores[0] > scores[1]


def test_perplexity_baseline_ranks_predictable_text_first(tmp_path, monkeypatch):
    """A model that has only seen one sentence finds it far more predictable than noise."""
    from selection.builtin import perplexity
    from datamill.models import resolve_model

    tiny = resolve_model("builtin:tiny-llama", base_dir=tmp_path, cache_dir=tmp_path / "models")
    from train.api import fine_tune

    seen = "the cat sat on the mat and looked at the dog"
    out = fine_tune(tiny, [seen] * 16, tmp_path / "ft", loss_on="all", max_steps=30, lr=0.01, batch_size=4,
                    packing="off", checkpoint_every=None)
    texts = [seen, "zq xv wj kk pp qq rr zz yy xx", ""]
    low = perplexity(texts, [], model_dir=Path(out["model_dir"]))
    assert low[0] > low[1] and np.isfinite(low).all()
    high = perplexity(texts, [], model_dir=Path(out["model_dir"]), prefer="high")
    np.testing.assert_allclose(high, -low)
