"""The canonical instruction schema: every accepted shape, every rejection reason."""

from __future__ import annotations

import pytest

from datamill import records
from datamill.records import RecordError, normalize_frame, normalize_record, row_id, text_of

CONVERSATION = [
    {"role": "user", "content": "Name a prime.\n\nSmall, please."},
    {"role": "assistant", "content": "2"},
]
SHAPES = {
    "messages": {"messages": CONVERSATION},
    "prompt_response": {"prompt": "Name a prime.\n\nSmall, please.", "response": "2"},
    "alpaca": {"instruction": "Name a prime.", "input": "Small, please.", "output": "2"},
    "sharegpt": {"conversations": [{"from": "human", "value": "Name a prime.\n\nSmall, please."},
                                   {"from": "gpt", "value": "2"}]},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_normalises_to_the_same_conversation_and_id(shape):
    record = normalize_record(SHAPES[shape], source="src")
    assert record["messages"] == CONVERSATION
    assert record["id"] == row_id(CONVERSATION)
    assert len(record["id"]) == 16 and int(record["id"], 16) >= 0
    assert record["source"] == "src"
    assert {k: record[k] for k in records.PROVENANCE_COLUMNS} == dict.fromkeys(records.PROVENANCE_COLUMNS)


def test_system_prompt_extra_columns_and_provenance_are_kept():
    row = {"system": "Be brief.", "prompt": "Hi", "response": "Hello", "family": "chat",
           "gen_model": "smol", "gen_seed": "7"}
    record = normalize_record(row, "src")
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
    assert record["family"] == "chat"
    assert record["gen_model"] == "smol" and record["gen_seed"] == 7
    assert "prompt" not in record and "system" not in record


def test_alpaca_without_input_uses_the_instruction_alone():
    record = normalize_record({"instruction": "Say hi", "input": "", "output": "hi"}, "s")
    assert record["messages"][0] == {"role": "user", "content": "Say hi"}


def test_id_depends_on_content_only():
    a = normalize_record({"prompt": "p", "response": "r", "category": "x"}, "one")
    b = normalize_record({"prompt": "p", "response": "r", "category": "y"}, "two")
    c = normalize_record({"prompt": "p", "response": "r!"}, "one")
    assert a["id"] == b["id"] != c["id"]


@pytest.mark.parametrize("row, reason", [
    ({"question": "q", "answer": "a"}, "missing field: expected one of messages | prompt+response"),
    ({"prompt": "only a prompt"}, "missing field"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     "empty content in message 2 (assistant)"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "unknown role 'bot' in message 1"),
    ({"messages": [{"role": "user", "content": "q"}]}, "messages must contain a user and an assistant turn"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
     "unknown role 'robot' in message 2"),
    ({"messages": "not json"}, "field 'messages' is text that is not valid JSON"),
    ({"prompt": "q", "response": 3}, "field 'response' must be a string"),
    ({"prompt": "q", "response": "a", "gen_seed": "seven"}, "gen_seed must be an integer"),
])
def test_rejection_reasons_name_the_problem(row, reason):
    with pytest.raises(RecordError) as err:
        normalize_record(row, "src")
    assert reason in err.value.reason


def test_normalize_frame_splits_good_and_rejected_rows():
    rows = [(1, {"prompt": "a", "response": "b", "family": "f1"}),
            (2, {"prompt": "a"}),
            (3, {"messages": CONVERSATION}),
            (4, {"prompt": "x" * 5000, "response": "y"})]
    ok, rejected = normalize_frame(rows, "src", max_row_bytes=1000)
    assert ok.columns[:7] == ["id", "messages", "source", "gen_prompt", "gen_model", "gen_seed", "parent_id"]
    assert ok.schema == {**records.INSTRUCTION_SCHEMA, "family": ok.schema["family"]}
    assert ok["family"].to_list() == ["f1", None]
    assert rejected.columns == ["line", "reason", "raw"]
    assert rejected["line"].to_list() == [2, 4]
    assert "missing field" in rejected["reason"][0]
    assert "row too large" in rejected["reason"][1] and "max_row_bytes=1,000" in rejected["reason"][1]
    assert len(rejected["raw"][1]) == records.MAX_RAW_CHARS


def test_normalize_frame_of_nothing_has_the_schema():
    ok, rejected = normalize_frame([], "src")
    assert ok.height == 0 and ok.schema == records.INSTRUCTION_SCHEMA
    assert rejected.height == 0 and rejected.schema == records.REJECTED_SCHEMA


def test_text_of_joins_contents():
    assert text_of(CONVERSATION) == "Name a prime.\n\nSmall, please.\n2"
    assert text_of(None) == ""


def test_importing_records_does_not_import_polars():
    import subprocess
    import sys

    code = "import sys, datamill.records, datamill.steps.source, datamill.steps.dedup; " \
           "print(sorted(m for m in ('polars', 'pyarrow', 'datasets', 'datasketch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
