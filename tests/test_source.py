"""The `source` step: every input format, every rejection reason, offline hub errors."""

from __future__ import annotations

import json

import polars as pl
import pydantic
import pytest
from helpers_steps import run_step

from datamill.errors import DatamillError, FieldError
from datamill.records import INSTRUCTION_SCHEMA, row_id
from datamill.step import Env
from datamill.steps.source import SourceStep

GOOD = [{"prompt": f"question {i}", "response": f"answer {i}", "family": "f"} for i in range(3)]


def jsonl(rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def run_source(tmp_path, config, name="src"):
    return run_step(SourceStep, config, tmp_path, name=name)


def test_jsonl_bad_lines_are_rejected_with_line_and_reason(tmp_path):
    lines = [
        GOOD[0],                                                        # 1 ok
        b'{"prompt": "broken", "response": ',                           # 2 bad JSON
        b'{"prompt": "caf\xe9", "response": "x"}',                      # 3 invalid UTF-8 (latin-1 e-acute)
        GOOD[1],                                                        # 4 ok
        {"question": "q", "answer": "a"},                               # 5 missing field
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},  # 6 empty
        {"prompt": "x" * 3000, "response": "y"},                        # 7 oversized
        b"[1, 2]",                                                      # 8 not an object
        b"",                                                            # 9 blank: not a row
        GOOD[2],                                                        # 10 ok
    ]
    (tmp_path / "data.jsonl").write_bytes(jsonl(lines))
    ctx, tables = run_source(tmp_path, {"path": "data.jsonl", "max_row_bytes": 2000})

    ok, rejected = tables["main"], tables["rejected"]
    assert ok["messages"].list.get(0).struct.field("content").to_list() == [r["prompt"] for r in GOOD]
    assert ok["source"].unique().to_list() == ["src"]
    assert ok["family"].to_list() == ["f", "f", "f"]
    assert {k: ok.schema[k] for k in INSTRUCTION_SCHEMA} == INSTRUCTION_SCHEMA

    reasons = dict(zip(rejected["line"].to_list(), rejected["reason"].to_list()))
    assert sorted(reasons) == [2, 3, 5, 6, 7, 8]
    assert reasons[2].startswith("invalid JSON")
    assert reasons[3].startswith("invalid UTF-8") and "0xe9" in reasons[3]
    assert reasons[5].startswith("missing field")
    assert reasons[6] == "empty content in message 2 (assistant)"
    assert reasons[7].startswith("row too large")
    assert "expected an object" in reasons[8]
    assert rejected.columns == ["line", "reason", "raw", "file"]
    assert rejected["file"].unique().to_list() == ["data.jsonl"]
    assert rejected.filter(pl.col("line") == 3)["raw"][0].startswith('{"prompt": "caf')
    assert ctx.stats["rows_in"] == 9 and ctx.stats["rows_out"] == 3 and ctx.stats["rejected"] == 6


def test_an_empty_rejected_table_is_always_written(tmp_path):
    (tmp_path / "data.jsonl").write_bytes(jsonl(GOOD))
    _, tables = run_source(tmp_path, {"path": "data.jsonl"})
    assert tables["rejected"].height == 0
    assert tables["rejected"].columns == ["line", "reason", "raw", "file"]


def test_parquet_source(tmp_path):
    frame = pl.DataFrame({
        "messages": [[{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
                     [{"role": "user", "content": "q2"}, {"role": "assistant", "content": " "}]],
        "category": ["c1", "c2"],
    })
    frame.write_parquet(tmp_path / "data.parquet")
    _, tables = run_source(tmp_path, {"path": "data.parquet"})
    assert tables["main"]["category"].to_list() == ["c1"]
    assert tables["main"]["id"][0] == row_id([{"role": "user", "content": "q1"},
                                              {"role": "assistant", "content": "a1"}])
    assert tables["rejected"]["line"].to_list() == [2]


def test_csv_source_reads_text_as_text(tmp_path):
    (tmp_path / "data.csv").write_text(
        "instruction,input,output,gen_seed\nAdd the numbers,42,ok,3\nSay hi,,hi,\n,,missing,\n")
    _, tables = run_source(tmp_path, {"path": "data.csv"})
    ok = tables["main"]
    assert ok["messages"].list.get(0).struct.field("content").to_list() == ["Add the numbers\n\n42", "Say hi"]
    assert ok["gen_seed"].to_list() == [3, None]
    assert tables["rejected"]["line"].to_list() == [4]  # the file line: the header is line 1
    assert "empty content in message 1 (user)" in tables["rejected"]["reason"][0]


def test_hf_disk_source_dataset_and_dataset_dict(tmp_path):
    import datasets

    dataset = datasets.Dataset.from_list(GOOD)
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "dd"))

    _, tables = run_source(tmp_path, {"path": "saved"})
    assert tables["main"].height == 3
    _, tables = run_source(tmp_path, {"path": "dd", "split": "test"}, name="dd")
    assert tables["main"].height == 1
    with pytest.raises(DatamillError, match="no split 'dev'"):
        run_source(tmp_path, {"path": "dd", "split": "dev"}, name="dd2")


def test_json_array_and_json_lines_in_a_json_file(tmp_path):
    (tmp_path / "array.json").write_text(json.dumps([GOOD[0], "not an object", GOOD[1]]))
    _, tables = run_source(tmp_path, {"path": "array.json"})
    assert tables["main"].height == 2
    assert tables["rejected"]["line"].to_list() == [2]

    (tmp_path / "lines.json").write_bytes(jsonl(GOOD))
    _, tables = run_source(tmp_path, {"path": "lines.json"}, name="lines")
    assert tables["main"].height == 3


def test_raw_schema_keeps_columns_but_rejects_bad_lines(tmp_path):
    lines = [{"text": "a", "n": 1}, b"{oops", {"text": "b" * 500, "n": 2}, {"text": "c", "n": 3}]
    (tmp_path / "data.jsonl").write_bytes(jsonl(lines))
    _, tables = run_source(tmp_path, {"path": "data.jsonl", "schema": "raw", "max_row_bytes": 100})
    assert tables["main"].columns == ["text", "n"]
    assert tables["main"]["n"].to_list() == [1, 3]
    assert tables["rejected"]["line"].to_list() == [2, 3]


def test_raw_parquet_keeps_its_types(tmp_path):
    pl.DataFrame({"x": [1, 2], "y": [[1.0], [2.0]]}).write_parquet(tmp_path / "t.parquet")
    _, tables = run_source(tmp_path, {"path": "t.parquet", "schema": "raw"})
    assert tables["main"].schema == {"x": pl.Int64, "y": pl.List(pl.Float64)}


def test_limit_and_folder_of_files(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(jsonl(GOOD[:2]))
    (folder / "b.jsonl").write_bytes(jsonl([b"{bad", GOOD[2]]))
    _, tables = run_source(tmp_path, {"path": "shards"})
    assert tables["main"].height == 3
    assert tables["rejected"].select("file", "line").rows() == [("b.jsonl", 1)]

    ctx, tables = run_source(tmp_path, {"path": "shards", "limit": 3}, name="limited")
    assert tables["main"].height == 2 and tables["rejected"].height == 1
    assert ctx.stats["rows_in"] == 3


def test_missing_file_is_a_field_error_at_check_time(tmp_path):
    step = SourceStep("src", SourceStep.Config(path="nope/data.jsonl"))
    with pytest.raises(FieldError) as err:
        step.check(Env(base_dir=tmp_path))
    assert err.value.loc == ("path",)
    assert err.value.message == f"file not found: {tmp_path.resolve() / 'nope' / 'data.jsonl'}"


def test_unknown_suffix_asks_for_a_format(tmp_path):
    (tmp_path / "data.txt").write_text("{}\n")
    step = SourceStep("src", SourceStep.Config(path="data.txt"))
    with pytest.raises(FieldError, match="set format"):
        step.check(Env(base_dir=tmp_path))
    SourceStep("src", SourceStep.Config(path="data.txt", format="jsonl")).check(Env(base_dir=tmp_path))


def test_key_material_follows_the_content(tmp_path):
    path = tmp_path / "data.jsonl"
    step = SourceStep("src", SourceStep.Config(path="data.jsonl"))
    path.write_bytes(jsonl(GOOD))
    first = step.key_material(Env(base_dir=tmp_path))
    assert step.key_material(Env(base_dir=tmp_path)) == first
    path.write_bytes(jsonl(GOOD[:2]))
    assert step.key_material(Env(base_dir=tmp_path)) != first


@pytest.mark.parametrize("config, message", [
    ({}, "exactly one of `path`"),
    ({"path": "a.jsonl", "hf": "x/y"}, "exactly one of `path`"),
    ({"path": "a.jsonl", "revision": "main"}, "only apply to hub sources"),
    ({"path": "a.jsonl", "shape": "raw"}, "Extra inputs are not permitted"),
])
def test_config_errors(config, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        SourceStep.Config.model_validate(config)


def test_config_schema_field_is_spelled_schema():
    config = SourceStep.Config.model_validate({"path": "a.csv", "schema": "raw"})
    assert config.record_schema == "raw"
    assert config.model_dump()["schema"] == "raw"
    assert "schema" in SourceStep.Config.model_json_schema()["properties"]


def test_hub_dataset_offline_gives_a_clear_error(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    with pytest.raises(DatamillError) as err:
        run_source(tmp_path, {"hf": "someone/not-cached-dataset-xyz"})
    message = str(err.value)
    assert "cannot download dataset 'someone/not-cached-dataset-xyz' from the Hugging Face hub (offline?)" in message
    assert "path:" in message


# --- CSV records, one at a time --------------------------------------------------------------

def rejected_by_line(tables) -> dict[int, str]:
    return dict(zip(tables["rejected"]["line"].to_list(), tables["rejected"]["reason"].to_list()))


def test_csv_ragged_rows_are_rejected_and_the_good_rows_kept(tmp_path):
    (tmp_path / "data.csv").write_bytes(
        b"prompt,response\n"            # 1 header
        b"q1,a1\n"                      # 2 ok
        b"q2,a2,extra\n"                # 3 one field too many
        b"q3\n"                         # 4 one field short
        b"\n"                           # 5 blank: no record
        b'q4,"a ""quoted"" 4"\n'        # 6 ok
        b'q5,"a5"tail\n'                # 7 text after a closing quote
        b"caf\xe9,a6\n"                 # 8 invalid UTF-8
        b"q7,a7\n")                     # 9 ok
    ctx, tables = run_source(tmp_path, {"path": "data.csv"})
    users = tables["main"]["messages"].list.get(0).struct.field("content").to_list()
    assert users == ["q1", "q4", "q7"]
    assert tables["main"]["messages"].list.get(1).struct.field("content")[1] == 'a "quoted" 4'
    reasons = rejected_by_line(tables)
    assert sorted(reasons) == [3, 4, 7, 8]
    assert reasons[3] == "3 fields, but the header (line 1) has 2"
    assert reasons[4] == "1 fields, but the header (line 1) has 2"
    assert reasons[7].startswith("malformed CSV record")
    assert reasons[8].startswith("invalid UTF-8: byte 0xe9")
    assert tables["rejected"].filter(pl.col("line") == 3)["raw"][0] == "q2,a2,extra"
    assert ctx.stats["rows_out"] == 3 and ctx.stats["rejected"] == 4
    assert ctx.stats["warning"].startswith("4 of 7 rows rejected (see src__rejected): ")


def test_csv_unterminated_quote_rejects_the_rest_and_keeps_the_rows_before(tmp_path):
    (tmp_path / "data.csv").write_text(
        'prompt,response\nq1,a1\nq2,a2\nq3,"never closed\nq4,a4\nq5,a5\n')
    _, tables = run_source(tmp_path, {"path": "data.csv"})
    assert tables["main"]["messages"].list.get(0).struct.field("content").to_list() == ["q1", "q2"]
    assert rejected_by_line(tables) == {
        4: "unterminated quoted field starting on line 4: every line after it, to the end of the file "
           "(line 6), was read as part of it"}
    assert tables["rejected"]["raw"][0] == 'q3,"never closed\nq4,a4\nq5,a5'


def test_csv_multi_line_fields_keep_the_line_numbers_of_later_records(tmp_path):
    (tmp_path / "data.csv").write_text(
        'prompt,response\n'                 # 1
        'q1,"first line\nsecond line\n"\n'  # 2-4: one record over three lines
        'q2,a2,extra\n'                     # 5 ragged
        '"multi\nline question",\n'         # 6-7: empty response
        'q3,a3\n')                          # 8
    _, tables = run_source(tmp_path, {"path": "data.csv"})
    assert tables["main"]["messages"].list.get(1).struct.field("content").to_list() == [
        "first line\nsecond line\n", "a3"]
    reasons = rejected_by_line(tables)
    assert sorted(reasons) == [5, 6]
    assert reasons[5].startswith("3 fields")
    assert reasons[6] == "empty content in message 2 (assistant)"


def test_csv_with_a_repeated_header_column_is_a_clear_error(tmp_path):
    (tmp_path / "data.csv").write_text("prompt,response,prompt\nq,a,q\n")
    with pytest.raises(DatamillError, match=r"data.csv line 1: the CSV header repeats column 'prompt'"):
        run_source(tmp_path, {"path": "data.csv"})


def test_raw_csv_infers_types_from_the_good_rows(tmp_path):
    (tmp_path / "data.csv").write_text('n,x,text\n1,0.5,"a, b"\n2,1.5\n3,,c\n')
    _, tables = run_source(tmp_path, {"path": "data.csv", "schema": "raw"})
    assert tables["main"].schema == {"n": pl.Int64, "x": pl.Float64, "text": pl.String}
    assert tables["main"].rows() == [(1, 0.5, "a, b"), (3, None, "c")]
    assert tables["rejected"]["line"].to_list() == [3]


# --- empty inputs and sources that reject everything -----------------------------------------

def _write_empty(tmp_path, kind: str) -> str:
    """An input with no rows, in each format; returns its path."""
    if kind == "jsonl":
        (tmp_path / "e.jsonl").write_text("")
        return "e.jsonl"
    if kind == "json array":
        (tmp_path / "e.json").write_text("[]")
        return "e.json"
    if kind == "parquet":
        pl.DataFrame(schema={"prompt": pl.String, "response": pl.String}).write_parquet(tmp_path / "e.parquet")
        return "e.parquet"
    if kind == "csv header only":
        (tmp_path / "e.csv").write_text("prompt,response\n")
        return "e.csv"
    if kind == "csv empty":
        (tmp_path / "e.csv").write_text("")
        return "e.csv"
    if kind == "hf_disk":
        import datasets

        datasets.Dataset.from_dict({"prompt": [], "response": []}).save_to_disk(str(tmp_path / "e"))
        return "e"
    raise AssertionError(kind)


EMPTY_KINDS = ["jsonl", "json array", "parquet", "csv header only", "csv empty", "hf_disk"]


@pytest.mark.parametrize("kind", EMPTY_KINDS)
def test_an_empty_input_fails_the_same_way_in_every_format(tmp_path, kind):
    path = _write_empty(tmp_path, kind)
    with pytest.raises(DatamillError) as err:
        run_source(tmp_path, {"path": path})
    assert str(err.value) == f"read 0 rows from {path}; set `allow_empty: true` on source 'src' if that is expected"


@pytest.mark.parametrize("kind", EMPTY_KINDS)
def test_allow_empty_gives_an_empty_instruction_table_in_every_format(tmp_path, kind):
    path = _write_empty(tmp_path, kind)
    ctx, tables = run_source(tmp_path, {"path": path, "allow_empty": True})
    assert tables["main"].height == 0 and tables["rejected"].height == 0
    assert {k: tables["main"].schema[k] for k in INSTRUCTION_SCHEMA} == INSTRUCTION_SCHEMA
    assert "warning" not in ctx.stats


def _datamill(*args, cwd):
    """The CLI in a subprocess; a wide console so that the step summary lines are not wrapped."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "datamill.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "300"})


def test_a_source_that_rejects_every_row_fails_with_the_reasons_and_the_accepted_layouts(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(4)] + [b"{not json"]
    (tmp_path / "qa.jsonl").write_bytes(jsonl(rows))
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: t\ntracking: {enabled: false}\nsources:\n  qa: {path: qa.jsonl}\n"
                    "steps:\n  n: {sql: SELECT count(*) AS n FROM qa}\n")

    failed = _datamill("run", str(spec), cwd=tmp_path)
    assert failed.returncode == 1
    message = failed.stderr
    assert "step 'qa' (source) failed: all 5 rows of qa.jsonl were rejected; main reasons:" in message
    assert ("4 x missing field: expected one of messages | prompt+response | instruction+output | "
            "conversations (row has: answer, question) (first: qa.jsonl line 1)") in message
    assert "1 x invalid JSON" in message and "(first: qa.jsonl line 5)" in message
    assert ("accepted rows: {messages: [{role, content}, ...]}, {prompt, response} (+ system), "
            "{instruction, output} (+ input; Alpaca), {conversations: [{from, value}, ...]} (ShareGPT); "
            "or set `schema: raw` to keep columns as they are") in message
    assert "set `allow_empty: true` on source 'qa'" in message

    spec.write_text(spec.read_text().replace("{path: qa.jsonl}", "{path: qa.jsonl, allow_empty: true}"))
    allowed = _datamill("run", str(spec), cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    # the step's summary line still says what happened
    assert "warning: 5 of 5 rows rejected (see qa__rejected): 4 x missing field" in allowed.stderr
    rejected = _datamill("sql", str(spec), "SELECT line FROM qa__rejected ORDER BY line", cwd=tmp_path)
    assert rejected.returncode == 0 and "5" in rejected.stdout
