"""Preference rows: every accepted layout gives the same canonical row; every rejection names
its reason; `schema: preference` sources read every input format and keep bad rows with their line."""

from __future__ import annotations

import csv
import io
import json

import polars as pl
import pytest
from helpers_steps import run_step

from datamill import records
from datamill.errors import DatamillError
from datamill.records import (PREFERENCE_SCHEMA, RecordError, normalize_preference_frame,
                              normalize_preference_record, preference_id)
from datamill.steps.source import SourceStep

QUESTION = "What is the capital of Peru?"
PROMPT = [{"role": "user", "content": QUESTION}]
CHOSEN = [{"role": "assistant", "content": "The capital of Peru is Lima."}]
REJECTED = [{"role": "assistant", "content": "The capital of Peru is Cusco."}]

LAYOUTS = {
    "conversational": {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
    "standard": {"prompt": QUESTION, "chosen": CHOSEN[0]["content"], "rejected": REJECTED[0]["content"]},
    "implicit": {"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED},
    "implicit_with_prompt_text": {"prompt": QUESTION, "chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED},
    "json_text": {"prompt": json.dumps(PROMPT), "chosen": json.dumps(CHOSEN), "rejected": json.dumps(REJECTED)},
    "json_text_implicit": {"chosen": json.dumps(PROMPT + CHOSEN), "rejected": json.dumps(PROMPT + REJECTED)},
    "prompt_turns_prefix": {"prompt": PROMPT, "chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED},
    "sharegpt_turns": {"prompt": [{"from": "human", "value": QUESTION}],
                       "chosen": [{"from": "gpt", "value": CHOSEN[0]["content"]}],
                       "rejected": [{"from": "gpt", "value": REJECTED[0]["content"]}]},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_normalises_to_the_same_canonical_row(layout):
    record = normalize_preference_record(LAYOUTS[layout], "prefs")
    assert record["prompt"] == PROMPT and record["chosen"] == CHOSEN and record["rejected"] == REJECTED
    assert record["id"] == preference_id(PROMPT, CHOSEN, REJECTED)
    assert len(record["id"]) == 16
    assert record["source"] == "prefs"
    assert {k: record[k] for k in records.PROVENANCE_COLUMNS} == dict.fromkeys(records.PROVENANCE_COLUMNS)
    assert set(record) == {*records.PREFERENCE_COLUMNS}  # nothing left over: every input field consumed


def test_ultrafeedback_binarized_row():
    """HuggingFaceH4/ultrafeedback_binarized: prompt text, whole conversations, scores, messages."""
    row = {"prompt": QUESTION, "prompt_id": "abc123",
           "chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED,
           "messages": PROMPT + CHOSEN, "score_chosen": 9.0, "score_rejected": 3.5}
    record = normalize_preference_record(row, "uf")
    assert (record["prompt"], record["chosen"], record["rejected"]) == (PROMPT, CHOSEN, REJECTED)
    assert record["id"] == preference_id(PROMPT, CHOSEN, REJECTED)
    # extra columns are kept as they are
    assert record["score_chosen"] == 9.0 and record["score_rejected"] == 3.5
    assert record["prompt_id"] == "abc123" and record["messages"] == PROMPT + CHOSEN


def test_system_turns_multi_turn_prompts_and_provenance():
    system = {"role": "system", "content": "Answer briefly."}
    # standard layout with a system text
    record = normalize_preference_record({"system": "Answer briefly.", "prompt": QUESTION, "chosen": "Lima",
                                          "rejected": "Cusco", "gen_model": "smol", "gen_seed": "3"}, "s")
    assert record["prompt"] == [system, *PROMPT] and "system" not in record
    assert record["gen_model"] == "smol" and record["gen_seed"] == 3
    # whole conversations sharing system, user, assistant, user turns: all shared turns are the prompt
    earlier = [system, *PROMPT, {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "And Chile?"}]
    record = normalize_preference_record({"chosen": earlier + [{"role": "assistant", "content": "Santiago."}],
                                          "rejected": earlier + [{"role": "assistant", "content": "Lima."}]}, "s")
    assert record["prompt"] == earlier
    assert record["chosen"] == [{"role": "assistant", "content": "Santiago."}]


def test_id_depends_on_prompt_chosen_and_rejected():
    base = normalize_preference_record(LAYOUTS["standard"], "a")
    other_source = normalize_preference_record({**LAYOUTS["standard"], "note": "x"}, "b")
    swapped = normalize_preference_record({**LAYOUTS["standard"], "chosen": "The capital of Peru is Cusco.",
                                           "rejected": "The capital of Peru is Lima."}, "a")
    assert base["id"] == other_source["id"] != swapped["id"]


@pytest.mark.parametrize("row, reason", [
    ({"prompt": QUESTION, "chosen": "Lima", "rejected": "Lima"}, "chosen and rejected are identical"),
    ({"chosen": PROMPT + CHOSEN, "rejected": PROMPT + CHOSEN}, "chosen and rejected are identical"),
    ({"prompt": QUESTION, "chosen": "  ", "rejected": "Lima"}, "empty completion: chosen message 1"),
    ({"prompt": PROMPT, "chosen": [], "rejected": REJECTED}, "empty completion: chosen has no turns"),
    ({"chosen": PROMPT + CHOSEN, "rejected": PROMPT + CHOSEN + [{"role": "user", "content": "More?"},
                                                               {"role": "assistant", "content": "No."}]},
     "empty completion: chosen has no turns after the prompt"),
    ({"prompt": PROMPT, "chosen": CHOSEN + [{"role": "user", "content": "thanks"}], "rejected": REJECTED},
     "chosen must end with an assistant turn (its last turn is a user turn)"),
    ({"prompt": PROMPT, "chosen": CHOSEN, "rejected": [{"role": "bot", "content": "Cusco"}]},
     "rejected: unknown role 'bot' in message 1 (expected one of system, user, assistant)"),
    ({"prompt": [{"role": "tool", "content": "x"}], "chosen": CHOSEN, "rejected": REJECTED},
     "prompt: unknown role 'tool'"),
    ({"prompt": QUESTION, "chosen": "Lima"}, "missing field 'rejected'"),
    ({"question": QUESTION}, "missing field 'chosen' and 'rejected'"),
    ({"chosen": "Lima", "rejected": "Cusco"}, "missing field 'prompt'"),
    ({"prompt": QUESTION, "chosen": PROMPT + CHOSEN, "rejected": REJECTED}, "give both in the same form"),
    ({"prompt": "Capital of Chile?", "chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED},
     "field 'prompt' differs from the first user turn"),
    ({"chosen": PROMPT + CHOSEN, "rejected": [{"role": "user", "content": "Other?"}, *REJECTED]},
     "do not start with the same turn"),
    ({"prompt": [{"role": "system", "content": "Be brief."}], "chosen": CHOSEN, "rejected": REJECTED},
     "prompt has no user turn"),
    ({"prompt": 3, "chosen": CHOSEN, "rejected": REJECTED}, "field 'prompt' must be text or a list"),
    ({"prompt": QUESTION, "chosen": {"role": "assistant"}, "rejected": "x"}, "field 'chosen' must be text or a list"),
])
def test_rejection_reasons_name_the_problem(row, reason):
    with pytest.raises(RecordError) as err:
        normalize_preference_record(row, "src")
    assert reason in err.value.reason


def test_text_that_only_looks_like_json_stays_text():
    row = {"prompt": "[1, 2] + [3]?", "chosen": "[{oops", "rejected": "[1, 2, 3]"}
    record = normalize_preference_record(row, "s")
    assert record["prompt"] == [{"role": "user", "content": "[1, 2] + [3]?"}]
    assert record["chosen"] == [{"role": "assistant", "content": "[{oops"}]
    assert record["rejected"] == [{"role": "assistant", "content": "[1, 2, 3]"}]


def test_normalize_preference_frame_types_and_rejects():
    rows = [(1, {**LAYOUTS["standard"], "score_chosen": 8}), (2, {"prompt": "q", "chosen": "a", "rejected": "a"}),
            (3, LAYOUTS["implicit"])]
    ok, rejected = normalize_preference_frame(rows, "src")
    assert ok.schema == {**PREFERENCE_SCHEMA, "score_chosen": pl.Int64}
    assert ok["score_chosen"].to_list() == [8, None]
    assert rejected["line"].to_list() == [2] and rejected["reason"][0].startswith("chosen and rejected are identical")
    empty, _ = normalize_preference_frame([], "src")
    assert empty.schema == PREFERENCE_SCHEMA


def test_a_canonical_row_normalises_to_itself():
    record = normalize_preference_record(LAYOUTS["implicit_with_prompt_text"], "prefs")
    again = normalize_preference_record(record, "prefs")
    assert again == record


# --- the source step -----------------------------------------------------------------------

GOOD = [
    LAYOUTS["conversational"],
    {"prompt": "Add 2 and 3.", "chosen": "2 + 3 = 5", "rejected": "2 + 3 = 6", "family": "arithmetic"},
    {"prompt": QUESTION, "chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED, "score_chosen": 9.0},
]


def run_source(tmp_path, config, name="prefs"):
    return run_step(SourceStep, {"schema": "preference", **config}, tmp_path, name=name)


def test_mixed_jsonl_through_the_source_step(tmp_path):
    lines = [
        json.dumps(GOOD[0]),                                                    # 1 ok
        json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}),      # 2 identical
        '{"prompt": "broken", ',                                                # 3 bad JSON
        json.dumps(GOOD[1]),                                                    # 4 ok
        json.dumps({"prompt": "q", "chosen": "", "rejected": "b"}),             # 5 empty completion
        "",                                                                     # 6 blank: not a row
        json.dumps(GOOD[2]),                                                    # 7 ok
        json.dumps({"messages": PROMPT + CHOSEN}),                              # 8 an instruction row
    ]
    (tmp_path / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    ctx, tables = run_source(tmp_path, {"path": "prefs.jsonl"})
    ok, rejected = tables["main"], tables["rejected"]
    assert ok.columns[:9] == list(PREFERENCE_SCHEMA)
    assert {k: ok.schema[k] for k in PREFERENCE_SCHEMA} == PREFERENCE_SCHEMA
    assert ok["source"].unique().to_list() == ["prefs"]
    assert ok["family"].to_list() == [None, "arithmetic", None]
    assert ok["score_chosen"].to_list() == [None, None, 9.0]
    assert ok["id"][0] == ok["id"][2] == preference_id(PROMPT, CHOSEN, REJECTED)
    reasons = dict(zip(rejected["line"].to_list(), rejected["reason"].to_list()))
    assert sorted(reasons) == [2, 3, 5, 8]
    assert reasons[2].startswith("chosen and rejected are identical")
    assert reasons[3].startswith("invalid JSON")
    assert reasons[5].startswith("empty completion: chosen")
    assert reasons[8].startswith("missing field 'chosen' and 'rejected'")
    assert rejected.columns == ["line", "reason", "raw", "file"]
    assert json.loads(rejected.filter(pl.col("line") == 2)["raw"][0])["chosen"] == "same"
    assert ctx.stats["rows_in"] == 7 and ctx.stats["rows_out"] == 3 and ctx.stats["rejected"] == 4
    assert "4 of 7 rows rejected" in ctx.stats["warning"]


def test_csv_json_parquet_and_saved_dataset_give_the_same_rows(tmp_path):
    import datasets

    expected, _ = normalize_preference_frame(list(enumerate(GOOD[:2], 1)), "prefs")
    expected = expected.drop("family")
    # CSV: cells hold JSON lists or plain text
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["prompt", "chosen", "rejected"])
    writer.writerow([json.dumps(PROMPT), json.dumps(CHOSEN), json.dumps(REJECTED)])
    writer.writerow(["Add 2 and 3.", "2 + 3 = 5", "2 + 3 = 6"])
    writer.writerow(["q", "same", "same"])
    (tmp_path / "prefs.csv").write_text(text.getvalue())
    _, tables = run_source(tmp_path, {"path": "prefs.csv"}, name="prefs")
    assert tables["main"].equals(expected)
    assert tables["rejected"]["line"].to_list() == [4]  # the file line: the header is line 1

    rows = [{k: GOOD[i][k] for k in ("prompt", "chosen", "rejected")} for i in (0, 1)]
    (tmp_path / "prefs.json").write_text(json.dumps(rows))
    assert run_source(tmp_path / "j", {"path": str(tmp_path / "prefs.json")})[1]["main"].equals(expected)

    # Parquet and datasets hold conversations as lists of structs: the conversational layout
    conversational = [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
                      {"prompt": [{"role": "user", "content": "Add 2 and 3."}],
                       "chosen": [{"role": "assistant", "content": "2 + 3 = 5"}],
                       "rejected": [{"role": "assistant", "content": "2 + 3 = 6"}]}]
    pl.DataFrame(conversational).write_parquet(tmp_path / "prefs.parquet")
    assert run_source(tmp_path / "p", {"path": str(tmp_path / "prefs.parquet")})[1]["main"].equals(expected)
    datasets.Dataset.from_list(conversational).save_to_disk(str(tmp_path / "saved"))
    assert run_source(tmp_path / "d", {"path": str(tmp_path / "saved")})[1]["main"].equals(expected)


def test_all_rows_rejected_names_the_preference_layouts(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    with pytest.raises(DatamillError) as err:
        run_source(tmp_path, {"path": "bad.jsonl"})
    assert "accepted preference rows" in str(err.value)


def test_empty_preference_source_has_the_schema(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    _, tables = run_source(tmp_path, {"path": "empty.jsonl", "allow_empty": True})
    assert tables["main"].schema == PREFERENCE_SCHEMA


def test_limit_counts_preference_rows(tmp_path):
    (tmp_path / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in GOOD) + "\n")
    ctx, tables = run_source(tmp_path, {"path": "prefs.jsonl", "limit": 2})
    assert tables["main"].height == 2 and ctx.stats["rows_in"] == 2


def test_schema_value_in_the_config():
    config = SourceStep.Config.model_validate({"path": "a.jsonl", "schema": "preference"})
    assert config.record_schema == "preference"
    assert "preference" in json.dumps(SourceStep.Config.model_json_schema()["properties"]["schema"])
