"""The `pairs` step: verified, judge and two-model pairs; dedup; skipped groups and their reasons;
missing columns; the output is canonical preference data."""

from __future__ import annotations

import polars as pl
import pydantic
import pytest
from helpers_steps import run_step

from datagen.pairs_step import PairsStep
from datamill.errors import DatamillError
from datamill.records import PREFERENCE_SCHEMA, normalize_preference_record, row_id

PROMPTS = {
    "add": ("What is 12 + 30?", "42", "arithmetic"),
    "peru": ("What is the capital of Peru?", "Lima", "capitals"),
    "five": ("What is 5 + 5?", "10", "arithmetic"),
    "chat": ("Hi! How are you today?", None, "chat"),
    "lonely": ("What is 2 + 2?", "4", "arithmetic"),
}
SAMPLES = [  # (prompt key, reply, judge score)
    ("add", "12 + 30 = 42", 9.0),
    ("add", "The answer is 41.", 3.0),
    ("add", "42", 7.0),
    ("add", "It is 43.", 5.0),
    ("peru", "The capital of Peru is Lima.", 8.0),
    ("peru", "Lima", 8.0),
    ("five", "5 + 5 = 11", 2.0),
    ("five", "9", 1.0),
    ("chat", "Great, thanks!", 6.0),
    ("chat", "Fine.", 4.0),
    ("lonely", "4", 9.0),
]
OUTPUT_COLUMNS = [*PREFERENCE_SCHEMA, "chosen_id", "rejected_id", "chosen_request_id", "rejected_request_id",
                  "chosen_score", "rejected_score", "margin", "pair_source", "answer", "family", "difficulty"]


def samples(rows=SAMPLES, model="smol", with_scores=False) -> pl.DataFrame:
    """Sampled responses as `generate` with `input:` and `samples:` writes them (+ a judge score)."""
    out = []
    counts: dict[str, int] = {}
    for key, reply, score in rows:
        question, answer, family = PROMPTS[key]
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        sample = counts[key] = counts.get(key, -1) + 1
        row = {"id": row_id(messages), "messages": messages, "source": "gen", "gen_prompt": None,
               "gen_model": model, "gen_seed": 100 + sample, "parent_id": f"p-{key}", "answer": answer,
               "family": family, "difficulty": "easy", "sample": sample, "request_id": f"{model}-{key}-{sample}",
               "gen_finish_reason": "stop"}
        if with_scores:
            row.update({"judge_score": score, "judge_request_id": f"judge-{key}-{sample}"})
        out.append(row)
    return pl.DataFrame(out)


def run_pairs(tmp_path, config, inputs=None, name="prefs"):
    inputs = inputs if inputs is not None else {"samples": samples(with_scores=config.get("by") == "judge")}
    ctx, tables = run_step(PairsStep, {"input": "samples", **config} if config.get("by") != "models" else config,
                           tmp_path, name=name, inputs=inputs)
    return ctx, tables["main"], tables["skipped"]


def texts(pairs: pl.DataFrame, side: str) -> list[str]:
    return [turns[0]["content"] for turns in pairs[side].to_list()]


def skipped_reasons(skipped: pl.DataFrame) -> dict[str, str]:
    return dict(zip(skipped["parent_id"].to_list(), skipped["reason"].to_list()))


def test_verified_pairs_correct_against_incorrect(tmp_path):
    ctx, pairs, skipped = run_pairs(tmp_path, {"by": "verified"})
    assert pairs.columns == OUTPUT_COLUMNS
    assert pairs.height == 1
    row = pairs.row(0, named=True)
    assert row["prompt"] == [{"role": "user", "content": "What is 12 + 30?"}]
    assert texts(pairs, "chosen")[0] in ("12 + 30 = 42", "42")
    assert texts(pairs, "rejected")[0] in ("The answer is 41.", "It is 43.")
    assert (row["chosen_score"], row["rejected_score"], row["margin"]) == (1.0, 0.0, 1.0)
    assert row["pair_source"] == "verified" and row["source"] == "prefs"
    assert row["parent_id"] == "p-add" and row["answer"] == "42" and row["family"] == "arithmetic"
    frame = samples()
    chosen = frame.filter(pl.col("id") == row["chosen_id"]).row(0, named=True)
    rejected = frame.filter(pl.col("id") == row["rejected_id"]).row(0, named=True)
    assert chosen["messages"][-1]["content"] == texts(pairs, "chosen")[0]
    assert rejected["messages"][-1]["content"] == texts(pairs, "rejected")[0]
    assert row["chosen_request_id"] == chosen["request_id"] and row["rejected_request_id"] == rejected["request_id"]
    assert row["gen_model"] == "smol" and row["gen_seed"] == chosen["gen_seed"]

    assert skipped.columns == ["parent_id", "prompt", "responses", "reason", "reason_kind"]
    assert skipped_reasons(skipped) == {
        "p-peru": "all correct (2 responses)",
        "p-five": "all incorrect (2 responses)",
        "p-chat": "no answer: the 'chat' family has no checkable answer",
        "p-lonely": "fewer than 2 responses (1)",
    }
    assert ctx.stats["pairs"] == 1 and ctx.stats["groups"] == 5 and ctx.stats["responses"] == 11
    assert ctx.stats["skipped_by_reason"] == {"all correct": 1, "all incorrect": 1, "fewer than 2 responses": 1,
                                              "no answer": 1}


def test_output_is_canonical_preference_data(tmp_path):
    for config in ({"by": "verified", "per_prompt": 2}, {"by": "judge", "per_prompt": 3}):
        _, pairs, _ = run_pairs(tmp_path / config["by"], config)
        assert pairs.height >= 2
        assert {k: pairs.schema[k] for k in PREFERENCE_SCHEMA} == PREFERENCE_SCHEMA
        for row in pairs.iter_rows(named=True):
            assert normalize_preference_record(row, row["source"]) == row


def test_per_prompt_never_reuses_a_response_and_is_seeded(tmp_path):
    _, pairs, _ = run_pairs(tmp_path / "a", {"by": "verified", "per_prompt": 5})
    assert pairs.height == 2  # 2 correct and 2 incorrect answers to 12 + 30
    assert sorted(texts(pairs, "chosen")) == ["12 + 30 = 42", "42"]
    assert sorted(texts(pairs, "rejected")) == ["It is 43.", "The answer is 41."]
    assert len(set(pairs["id"].to_list())) == 2
    _, again, _ = run_pairs(tmp_path / "b", {"by": "verified", "per_prompt": 5})
    assert again.equals(pairs)
    orders = set()
    for seed in range(6):
        _, one, _ = run_pairs(tmp_path / f"s{seed}", {"by": "verified", "seed": seed})
        orders.add((texts(one, "chosen")[0], texts(one, "rejected")[0]))
    assert len(orders) > 1  # the seed decides which correct/incorrect answers pair first


def test_judge_pairs_best_against_worst_with_a_margin(tmp_path):
    ctx, pairs, skipped = run_pairs(tmp_path / "a", {"by": "judge", "per_prompt": 2})
    add = pairs.filter(pl.col("parent_id") == "p-add")
    # best (9) vs worst (3) first, then the next best (7) vs the next worst (5)
    assert list(zip(add["chosen_score"], add["rejected_score"])) == [(9.0, 3.0), (7.0, 5.0)]
    assert add["margin"].to_list() == [6.0, 2.0]
    assert texts(add, "chosen") == ["12 + 30 = 42", "42"]
    assert set(pairs["pair_source"]) == {"judge"}
    # chat has no answer, but a judge score: by: judge pairs it
    assert pairs.filter(pl.col("parent_id") == "p-chat")["chosen_score"].to_list() == [6.0]
    reasons = skipped_reasons(skipped)
    assert reasons["p-peru"] == "margin too small: all 2 responses scored 8"
    assert reasons["p-lonely"] == "fewer than 2 responses (1)"

    _, pairs, skipped = run_pairs(tmp_path / "b", {"by": "judge", "margin": 2.5, "per_prompt": 2})
    add = pairs.filter(pl.col("parent_id") == "p-add")
    assert list(zip(add["chosen_score"], add["rejected_score"])) == [(9.0, 3.0)]  # 7 - 5 = 2 < 2.5
    assert skipped_reasons(skipped)["p-chat"] == "margin too small: best 6 - worst 4 = 2, need >= 2.5"
    assert pairs.filter(pl.col("parent_id") == "p-five").height == 0


def test_judge_skips_unscored_responses(tmp_path):
    frame = samples(with_scores=True).with_columns(
        pl.when(pl.col("parent_id") == "p-five").then(None).otherwise(pl.col("judge_score")).alias("judge_score"))
    _, _, skipped = run_pairs(tmp_path, {"by": "judge"}, inputs={"samples": frame})
    assert skipped_reasons(skipped)["p-five"] == "fewer than 2 responses with a score (0 of 2)"


def test_models_pairs_a_strong_against_a_weak_model(tmp_path):
    strong = samples([("add", "12 + 30 = 42", 0), ("peru", "Lima", 0), ("five", "5 + 5 = 10", 0),
                      ("chat", "Great!", 0)], model="strong")
    weak = samples([("add", "41", 0), ("peru", "Quito", 0), ("five", "5 + 5 = 10", 0), ("chat", "Meh.", 0),
                    ("lonely", "5", 0)], model="weak")
    inputs = {"strong": strong, "weak": weak}
    config = {"by": "models", "chosen_input": "strong", "rejected_input": "weak"}
    ctx, pairs, skipped = run_pairs(tmp_path / "a", config, inputs=inputs)
    assert pairs["parent_id"].to_list() == ["p-add", "p-peru", "p-chat"]
    assert texts(pairs, "chosen") == ["12 + 30 = 42", "Lima", "Great!"]
    assert texts(pairs, "rejected") == ["41", "Quito", "Meh."]
    assert set(pairs["gen_model"]) == {"strong"} and set(pairs["pair_source"]) == {"models"}
    assert pairs["chosen_score"].is_null().all()
    assert pairs["rejected_id"][0] == weak["id"][0]
    assert skipped_reasons(skipped) == {
        "p-five": "identical responses: the responses that could pair have the same text",
        "p-lonely": "no chosen response: the group is only in rejected_input 'weak'"}

    _, pairs, skipped = run_pairs(tmp_path / "b", {**config, "require_correct": True}, inputs=inputs)
    assert pairs["parent_id"].to_list() == ["p-add", "p-peru"]
    assert pairs["chosen_score"].to_list() == [1.0, 1.0] and pairs["rejected_score"].to_list() == [0.0, 0.0]
    reasons = skipped_reasons(skipped)
    assert reasons["p-five"] == "no incorrect rejected response (require_correct)"
    assert reasons["p-chat"] == "no answer: the 'chat' family has no checkable answer"


def test_identical_pairs_are_made_once(tmp_path):
    # the same prompt sampled under two parent ids, with the same answers: the second group's pair
    # would be the first one again
    rows = [("add", "42", 9.0), ("add", "41", 1.0), ("add", "42", 9.0), ("add", "41", 1.0)]
    frame = samples(rows, with_scores=True).with_columns(
        pl.Series("parent_id", ["p-1", "p-1", "p-2", "p-2"]))
    ctx, pairs, skipped = run_pairs(tmp_path / "a", {"by": "verified"}, inputs={"samples": frame})
    assert pairs.height == 1 and pairs["parent_id"].to_list() == ["p-1"]
    assert skipped_reasons(skipped) == {
        "p-2": "duplicate pairs: every pair this group could give is already in the table"}
    assert ctx.stats["duplicates"] == 1
    # within one group: two equal correct and two equal incorrect answers make one pair, not two
    one_group = frame.with_columns(pl.lit("p-1").alias("parent_id"))
    _, pairs, _ = run_pairs(tmp_path / "b", {"by": "verified", "per_prompt": 2}, inputs={"samples": one_group})
    assert pairs.height == 1
    # the same text scored differently by a judge never pairs with itself
    same = samples([("add", "42", 9.0), ("add", "42", 2.0)], with_scores=True)
    _, pairs, skipped = run_pairs(tmp_path / "c", {"by": "judge"}, inputs={"samples": same})
    assert pairs.height == 0 and skipped["reason_kind"].to_list() == ["identical responses"]


def test_blank_replies_and_no_answer_values(tmp_path):
    rows = [("add", "42", 1.0), ("add", "  ", 0.0), ("lonely", "4", 1.0), ("lonely", "5", 0.0)]
    frame = samples(rows).with_columns(
        pl.when(pl.col("parent_id") == "p-lonely").then(None).otherwise(pl.col("answer")).alias("answer"))
    ctx, pairs, skipped = run_pairs(tmp_path, {"by": "verified"}, inputs={"samples": frame})
    assert pairs.height == 0
    assert skipped_reasons(skipped) == {"p-add": "fewer than 2 responses (1)",
                                        "p-lonely": "no answer: 'answer' is empty"}
    assert ctx.stats["empty_responses"] == 1


def test_missing_columns_name_the_column_and_the_step_that_writes_it(tmp_path):
    with pytest.raises(DatamillError) as err:
        run_pairs(tmp_path / "a", {"by": "judge"}, inputs={"samples": samples()})
    message = str(err.value)
    assert "pairs step 'prefs' (by: judge): table 'samples' has no column 'judge_score'" in message
    assert "a `judge` step writes `judge_score`" in message
    with pytest.raises(DatamillError, match="has no column 'parent_id'.*`generate` with `input:` and `samples:`"):
        run_pairs(tmp_path / "b", {"by": "verified"}, inputs={"samples": samples().drop("parent_id")})
    with pytest.raises(DatamillError, match="has no column 'answer'"):
        run_pairs(tmp_path / "c", {"by": "verified"}, inputs={"samples": samples().drop("answer")})
    with pytest.raises(DatamillError, match="has no column 'gold'"):
        run_pairs(tmp_path / "d", {"by": "verified", "answer": "gold"})
    not_responses = samples().with_columns(pl.col("messages").list.head(1))
    with pytest.raises(DatamillError, match="row 1 of 'samples' does not end with an assistant turn"):
        run_pairs(tmp_path / "e", {"by": "verified"}, inputs={"samples": not_responses})


@pytest.mark.parametrize("config, message", [
    ({"by": "verified"}, "by: verified needs `input`"),
    ({"by": "models", "chosen_input": "a"}, "needs `chosen_input` and `rejected_input`"),
    ({"by": "models", "input": "x", "chosen_input": "a", "rejected_input": "b"}, "not `input`"),
    ({"by": "judge", "input": "x", "chosen_input": "a"}, "only apply to by: models"),
    ({"by": "verified", "input": "x", "margin": 1}, "margin applies to by: judge"),
    ({"by": "verified", "input": "x", "require_correct": True}, "require_correct applies to by: models"),
    ({"by": "judge", "input": "x", "per_prompt": 0}, "greater than or equal to 1"),
    ({"by": "best", "input": "x"}, "'verified', 'judge' or 'models'"),
])
def test_config_errors(config, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        PairsStep.Config.model_validate(config)


def test_input_tables_and_lineage_columns():
    step = PairsStep("p", PairsStep.Config.model_validate({"by": "models", "chosen_input": "a", "rejected_input": "b"}))
    assert step.input_tables() == [(("chosen_input",), "a"), (("rejected_input",), "b")]
    step = PairsStep("p", PairsStep.Config.model_validate({"by": "judge", "input": "scored"}))
    assert step.input_tables() == [(("input",), "scored")]
    assert PairsStep.row_reference_columns == ("chosen_id", "rejected_id")


def test_pairs_in_a_spec_then_read_back_as_a_preference_source(tmp_path):
    """A spec: samples -> pairs; the pairs written as JSONL read back through `schema: preference`
    give the same canonical rows."""
    import json

    import datamill

    samples().write_parquet(tmp_path / "samples.parquet")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: prefs\ntracking: {enabled: false}\n"
                    "sources:\n  samples: {path: samples.parquet, schema: raw}\n"
                    "steps:\n  prefs: {pairs: {input: samples, by: verified, per_prompt: 2}}\n")
    result = datamill.run(spec)
    pairs, skipped = result.table("prefs"), result.table("prefs__skipped")
    assert pairs.height == 2 and skipped.height == 4

    with open(tmp_path / "pairs.jsonl", "w") as f:
        for row in pairs.iter_rows(named=True):
            f.write(json.dumps(row) + "\n")
    spec.write_text("name: back\ntracking: {enabled: false}\n"
                    "sources:\n  back: {path: pairs.jsonl, schema: preference}\n")
    back = datamill.run(spec).table("back")
    assert back.drop("source").equals(pairs.drop("source"))


def test_empty_input_gives_empty_tables_with_their_columns(tmp_path):
    ctx, pairs, skipped = run_pairs(tmp_path, {"by": "verified"}, inputs={"samples": samples().head(0)})
    assert pairs.height == 0 and pairs.columns == OUTPUT_COLUMNS
    assert pairs.schema["answer"] == pl.String
    assert skipped.height == 0 and "reason" in skipped.columns
    assert ctx.stats["pairs"] == 0 and ctx.stats["groups"] == 0
