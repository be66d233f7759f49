"""`generate` responding to a table's prompts, and k samples per prompt: seeds by row id and
sample, parent ids, carried columns, the request cache (resume, growing samples), and GenQA's
sample 0 keeping the requests (and cache) it always had."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from datagen import prompt_library
from datagen.generate_step import SEED_STRIDE, GenerateConfig, GenerateStep, plan_requests, plan_row_requests
from datagen.requests import request_id
from fake_backend import FakeBackend

ROOT = Path(__file__).resolve().parent.parent

SPEC = """\
name: gen
tracking: {{enabled: false}}
models:
  m: ./model
sources:
  tasks: {{generator: tasks, families: [arithmetic, capitals], n: 4, seed: 0}}
steps:
  answers:
    generate:
      model: m
      input: tasks
      samples: {samples}
      temperature: 0.8
      max_tokens: 64
{extra}"""


def write(spec_dir: Path, samples: int, extra: str = "") -> Path:
    path = spec_dir / "spec.yaml"
    path.write_text(SPEC.format(samples=samples, extra=extra))
    return path


def run(path: Path, overrides=None):
    import datamill

    return datamill.run(path, overrides, quiet=True)


def sent() -> list[str]:
    return [i for call in FakeBackend.calls for i in call]


def identity(spec_dir: Path) -> str:
    from datamill.models import model_identity

    return model_identity(str((spec_dir / "model").resolve()), spec_dir)


def test_samples_per_input_row_with_parent_ids_and_carried_columns(spec_dir, fake):
    FakeBackend.malformed = 0
    result = run(write(spec_dir, 3))
    tasks, rows = result.table("tasks"), result.table("answers")
    assert rows.height == 12 and result.table("answers__rejected").height == 0
    assert rows["parent_id"].to_list() == [i for i in tasks["id"].to_list() for _ in range(3)]
    assert rows["sample"].to_list() == [0, 1, 2] * 4 and rows.schema["sample"] == pl.Int64
    assert rows["gen_seed"].n_unique() == 12 and rows["request_id"].n_unique() == 12
    assert set(rows["source"]) == {"answers"} and set(rows["gen_model"]) == {"m"}
    # the prompt is the input's conversation without its reply; the reply is the raw output, stripped
    for row, task in zip(rows.iter_rows(named=True), [t for t in tasks.iter_rows(named=True) for _ in range(3)]):
        assert row["messages"][:-1] == task["messages"][:-1]
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"]
        assert row["messages"][-1]["content"] == row["messages"][-1]["content"].strip()
    from datamill.records import row_id

    assert rows["id"].to_list() == [row_id(m) for m in rows["messages"].to_list()]
    # every other input column is carried over unchanged
    carried = [c for c in tasks.columns if c not in ("id", "messages", "source", "gen_prompt", "gen_model",
                                                     "gen_seed", "parent_id")]
    assert {"answer", "family"} <= set(carried)
    repeated = tasks.select(carried).select(pl.all().repeat_by(3).explode())
    assert rows.select(carried).equals(repeated)
    stats = result.points[0].steps["answers"].stats
    assert stats["requests_total"] == 12 and stats["sent"] == 12 and stats["parsed"] == 12


def test_a_second_run_sends_nothing_and_more_samples_send_only_the_new_ones(spec_dir, fake):
    two = run(write(spec_dir, 2))
    assert len(sent()) == 8
    # a new key over the same requests (keep_truncated does not change them): all from the cache
    again = run(write(spec_dir, 2, "      keep_truncated: true\n"))
    assert len(sent()) == 8 and again.points[0].steps["answers"].stats["sent"] == 0
    assert again.table("answers").equals(two.table("answers"))
    # samples 2 -> 3: only the third sample of each row is sent; one of them fails
    tasks = two.table("tasks")
    cfg = GenerateConfig(model="m", input="tasks", samples=3, temperature=0.8, max_tokens=64)
    planned = plan_row_requests(cfg, tasks, identity(spec_dir))
    new = [p.request.id for p in planned if p.sample == 2]
    FakeBackend.fail = {new[1]}
    FakeBackend.calls = []
    three = run(write(spec_dir, 3))
    assert sent() == new
    rows, rejected = three.table("answers"), three.table("answers__rejected")
    assert rows.height == 11 and rejected.height == 1
    assert rejected["reason_kind"].to_list() == ["request_failed"] and "HTTP 500" in rejected["reason"][0]
    assert rejected["parent_id"].to_list() == [tasks["id"][1]] and rejected["sample"].to_list() == [2]
    old = two.table("answers")
    assert rows.filter(pl.col("sample") < 2).equals(old)
    stats = three.points[0].steps["answers"].stats
    assert stats["requests_cached"] == 8 and stats["sent"] == 4 and stats["failed"] == 1


def test_seeds_follow_the_row_id_not_its_position():
    rows = pl.DataFrame({"id": ["a", "b", "c"], "messages": [
        [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
        [{"role": "user", "content": "Q2"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q3"}]]})
    cfg = GenerateConfig(model="m", input="t", samples=2)
    forward = {(p.parent_id, p.sample): p.request for p in plan_row_requests(cfg, rows, "model-x")}
    reordered = pl.concat([rows.reverse(), pl.DataFrame({"id": ["d"], "messages": [[{"role": "user", "content": "Q4"}]]})])
    backward = {(p.parent_id, p.sample): p.request for p in plan_row_requests(cfg, reordered, "model-x")}
    assert all(backward[key] == request for key, request in forward.items())
    assert forward[("a", 0)].messages == [{"role": "user", "content": "Q1"}]  # the reply is dropped
    assert forward[("c", 1)].messages[0]["role"] == "system"
    assert forward[("a", 0)].seed != forward[("a", 1)].seed
    assert len({r.id for r in forward.values()}) == 6
    # a plain string column is one user message; a row without a prompt is rejected, not sent
    strings = pl.DataFrame({"id": ["x", "y"], "q": ["What is 2+2?", "  "]})
    planned = plan_row_requests(GenerateConfig(model="m", input="t", column="q"), strings, "model-x")
    assert planned[0].request.messages == [{"role": "user", "content": "What is 2+2?"}]
    assert planned[1].request is None and "empty prompt" in planned[1].problem


def test_genqa_sample_zero_keeps_the_old_requests():
    prompts = [prompt_library.load(p, ROOT) for p in ("academic", "math")]
    one = GenerateConfig(model="m", prompts=["academic", "math"], n=5, seed=3, temperature=0.7)
    three = one.model_copy(update={"samples": 3})
    plain, sampled = plan_requests(one, prompts, "model-x"), plan_requests(three, prompts, "model-x")
    assert len(sampled) == 15 and [p.sample for p in sampled[:3]] == [0, 1, 2]
    assert [p.request for p in sampled if p.sample == 0] == [p.request for p in plain]
    # sample 0's id is what the step always computed: seed * 1000003 + k
    first = plain[0].request
    assert first.seed == 3 * SEED_STRIDE and first.id == request_id(first.messages, 0.7, 0.95, 768, first.seed, "model-x")
    seeds = [p.request.seed for p in sampled if p.k == 0]
    assert len(set(seeds)) == 3 and len({p.request.id for p in sampled}) == 15
    assert all(p.request.messages == sampled[0].request.messages for p in sampled if p.k == 0)


def test_genqa_rows_have_a_sample_column(spec_dir, fake):
    path = spec_dir / "genqa.yaml"
    path.write_text("name: g\ntracking: {enabled: false}\nmodels:\n  m: ./model\nsteps:\n  genqa:\n    generate:\n"
                    "      model: m\n      prompts: [math]\n      n: 3\n      samples: 2\n")
    FakeBackend.malformed = 0
    rows = run(path).table("genqa")
    assert rows["sample"].to_list() == [0, 1] * 3
    assert rows["gen_seed"].n_unique() == 6


@pytest.mark.parametrize("config, message", [
    ({"prompts": ["math"], "n": 2, "input": "t"}, "not both"),
    ({}, "needs `prompts`"),
    ({"prompts": ["math"]}, "needs `n`"),
    ({"input": "t", "n": 4}, "leave n out"),
    ({"input": "t", "samples": 0}, "greater than or equal to 1"),
])
def test_prompts_or_input_is_required(config, message):
    import pydantic

    with pytest.raises(pydantic.ValidationError, match=message):
        GenerateConfig(model="m", **config)


def test_the_input_table_is_a_dependency(spec_dir):
    import datamill

    step = GenerateStep("g", GenerateConfig(model="m", input="tasks"))
    assert step.input_tables() == [(("input",), "tasks")]
    path = write(spec_dir, 1)
    plan = datamill.plans(path)[0]
    key = plan.by_name("answers").key
    assert datamill.plans(path, ["sources.tasks.n=5"])[0].by_name("answers").key != key
