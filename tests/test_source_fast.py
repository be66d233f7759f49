"""The `source` step reads by columns (`normalize_columns`, pyarrow's JSON reader) and leaves
the rows it cannot be sure of to the row path: its tables must be the row path's, exactly.

Each test runs the step twice on the same input, once by columns and once a row at a time
(`source._ROW_PATH`), and compares the tables (columns, order, types, values), the stats and
the errors. Small block sizes make the column path cut the input into many batches."""

from __future__ import annotations

import json

import polars as pl
import pytest
from helpers_steps import run_step
from polars.testing import assert_frame_equal

import datamill.records as records
import datamill.steps.source as source
from datamill.errors import DatamillError
from datamill.records import PY_WHITESPACE, row_id

MSGS = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def run_both(tmp_path, config, monkeypatch, name="src", most_by_rows=None):
    """Run the step by columns and by rows; assert equal tables and stats; -> (ctx, tables).
    `most_by_rows`: how many rows the column path may leave to `normalize_record` at most."""
    by_rows = []
    normalize = records.normalize_record
    monkeypatch.setattr(records, "normalize_record", lambda row, src: by_rows.append(1) or normalize(row, src))
    results = []
    for row_path in (False, True):
        monkeypatch.setattr(source, "_ROW_PATH", row_path)
        out = tmp_path / ("rows" if row_path else "columns")
        out.mkdir(exist_ok=True)
        try:
            results.append(run_step(source.SourceStep, config, out, name=name, base_dir=tmp_path))
        except DatamillError as err:
            results.append(err)
        if not row_path and most_by_rows is not None:
            assert len(by_rows) <= most_by_rows, f"{len(by_rows)} rows took the row path"
    columns, rows = results
    if isinstance(rows, DatamillError):
        assert isinstance(columns, DatamillError) and str(columns) == str(rows)
        return rows, None
    assert not isinstance(columns, DatamillError), columns
    (ctx_c, tables_c), (ctx_r, tables_r) = columns, rows
    assert tables_c.keys() == tables_r.keys()
    for table in tables_r:
        assert tables_c[table].schema == tables_r[table].schema, table
        assert_frame_equal(tables_c[table], tables_r[table])
    assert ctx_c.stats == ctx_r.stats
    return ctx_r, tables_r


def line(value) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value, ensure_ascii=False).encode()


def write_jsonl(path, lines, end=b"\n"):
    path.write_bytes(b"".join(line(v) + end for v in lines))


def good(i, **extra):
    return {"prompt": f"question {i}", "response": f"answer {i}", "family": "f", "n": i, **extra}


# Every accepted layout, the types `normalize_record` rejects, and the values that Python's json
# and pyarrow read differently: each is a row of the mixed corpus.
MIXED = [
    good(0, score=1.5, tags=["a", "b"], meta={"k": 1, "j": "x"}),
    b'{"prompt": "broken", "response": ',                                   # bad JSON
    b'{"prompt": "caf\xe9", "response": "x"}',                              # invalid UTF-8
    b"[1, 2]", b'"text"', b"5", b"null", b"true",                           # not objects
    b"", b"   ", b"\t",                                                     # blank lines
    b'  {"prompt": "indented", "response": "ok", "family": "f", "n": 7}',  # valid, leading spaces
    good(1, score=2, tags=[], meta={"j": "y"}),
    {"prompt": "p" * 700, "response": "oversized"},
    {"messages": MSGS, "family": "m"},
    {"messages": json.dumps(MSGS)},                                         # messages as JSON text
    {"messages": "[not json"},
    {"messages": {"role": "user"}},
    {"messages": ["hi", "there"]},
    {"messages": [{"role": "user", "content": "q"}]},                       # no assistant turn
    {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
    {"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
    {"messages": [None, {"role": "assistant", "content": "a"}]},
    {"messages": [], "prompt": "p", "response": "r"},                       # messages wins, and is empty
    {"messages": None, "prompt": "p", "response": "r", "n": 3},             # null messages: prompt+response
    {"prompt": "p", "response": "r", "system": "be brief"},
    {"prompt": "p", "response": "r", "system": "  "},
    {"prompt": "p", "response": "r", "system": 5},
    {"prompt": 5, "response": "r"},
    {"prompt": "p", "response": ["r"]},
    {"prompt": "p", "response": ""},
    {"prompt": "\u3000", "response": "r"},                                  # Python whitespace only
    {"prompt": "\x1c\x1f", "response": "r"},
    {"prompt": "p\u200b", "response": "r"},                                 # not whitespace in Python
    {"prompt": 'quotes " and \\ and \n newline \x00 \x7f \u2028 \U0001f600', "response": "r\t\x08\x0c"},
    {"instruction": "Add", "input": "1 2", "output": "3"},
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"instruction": "Say hi", "input": " \n", "output": "hi"},
    {"instruction": " ", "input": "x", "output": "hi"},
    {"instruction": "Say hi", "input": 3, "output": "hi"},
    {"instruction": "Say hi", "output": "hi", "prompt": "only prompt"},     # prompt becomes an extra column
    {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "h"},
                       {"from": "gpt", "value": "g"}]},
    {"conversations": json.dumps([{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}])},
    {"conversations": [{"from": "alien", "value": "h"}, {"from": "gpt", "value": "g"}]},
    {"question": "q", "answer": "a"},                                       # no layout
    {},
    {"prompt": "p", "response": "r", "gen_seed": "5"},
    {"prompt": "p", "response": "r", "gen_seed": " 7 "},
    {"prompt": "p", "response": "r", "gen_seed": ""},
    {"prompt": "p", "response": "r", "gen_seed": "abc"},
    {"prompt": "p", "response": "r", "gen_seed": "\u0663"},                 # int() reads Arabic-Indic digits
    {"prompt": "p", "response": "r", "gen_seed": "1_000"},
    {"prompt": "p", "response": "r", "gen_seed": 3.0},
    {"prompt": "p", "response": "r", "gen_seed": 3.5},
    {"prompt": "p", "response": "r", "gen_seed": True},
    {"prompt": "p", "response": "r", "gen_seed": 12, "gen_model": "m", "gen_prompt": 4, "parent_id": True},
    {"prompt": "p", "response": "r", "parent_id": 1.5},
    {"prompt": "p", "response": "r", "id": "given", "source": "elsewhere"},  # overwritten
    {"prompt": "p", "response": "r", "": "a key of no characters"},
    b'{"prompt": "p", "response": "r", "x": NaN}',
    b'{"prompt": "p", "response": "r", "x": -Infinity}',
    b'{"prompt": "p", "response": "r", "x": Inf}',                           # pyarrow reads it, Python does not
    b'{"prompt": "p", "response": "r", "x": -0}',
    b'{"prompt": "p", "response": "r", "x": 12345678901234567890}',
    b'{"prompt": "p", "response": "r", "x": 1e400}',
    b'{"prompt": "p", "response": "r", "p2": 1, "p2": 2}',                  # duplicate key: the last wins
    b'{"prompt": "p", "response": "r"} {"prompt": "two objects"}',
    b'{"prompt": "p", "response": "r", "when": "2024-01-01 10:00:00"}',      # pyarrow: a timestamp
    good(2, score=0.25),
]


@pytest.mark.parametrize("block_bytes", [32 << 20, 300])
def test_mixed_jsonl_equals_the_row_path(tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(source, "_BLOCK_BYTES", block_bytes)
    (tmp_path / "mixed.jsonl").write_bytes(b"\xef\xbb\xbf" + b"".join(line(v) + b"\n" for v in MIXED))
    ctx, tables = run_both(tmp_path, {"path": "mixed.jsonl", "max_row_bytes": 500}, monkeypatch)
    assert tables["main"].height > 20 and tables["rejected"].height > 20
    assert "warning" in ctx.stats


def test_columns_take_the_common_rows(tmp_path, monkeypatch):
    """The column path's own cases: many good rows around a few bad ones, CRLF line ends."""
    rows = [good(i, score=i / 2, tags=[str(i)], meta={"a": i}) for i in range(200)]
    rows[5] = {"prompt": "", "response": "empty prompt"}
    rows[50] = {"prompt": "p", "response": "r", "gen_seed": "42", "family": "f", "n": 1, "score": 1.0,
                "tags": [], "meta": {"a": 1}}  # a seed given as text
    rows[120] = b"{oops"
    write_jsonl(tmp_path / "d.jsonl", rows, end=b"\r\n")
    _, tables = run_both(tmp_path, {"path": "d.jsonl"}, monkeypatch, most_by_rows=1)
    main = tables["main"]
    assert main.height == 198
    assert main.columns == ["id", "messages", "source", "gen_prompt", "gen_model", "gen_seed", "parent_id",
                            "family", "n", "score", "tags", "meta"]
    assert main["id"][0] == row_id([{"role": "user", "content": "question 0"},
                                    {"role": "assistant", "content": "answer 0"}])


@pytest.mark.parametrize("shape", ["messages", "conversations", "instruction", "system"])
def test_each_layout_by_columns(tmp_path, monkeypatch, shape):
    def row(i):
        text = f"t{i} \"quoted\" \\ \n\t\x01 é \U0001f600"
        if shape == "messages":
            return {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": text},
                                 {"role": "assistant", "content": "a", "name": "x"}], "k": i}
        if shape == "conversations":
            return {"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "g"}], "k": i}
        if shape == "instruction":
            return {"instruction": text, "input": "" if i % 2 else f"in{i}", "output": "o", "k": i}
        return {"system": "" if i % 3 else "sys", "prompt": text, "response": "r", "k": i}

    write_jsonl(tmp_path / "d.jsonl", [row(i) for i in range(30)])
    _, tables = run_both(tmp_path, {"path": "d.jsonl"}, monkeypatch, most_by_rows=0)
    assert tables["main"].height == 30
    messages = tables["main"]["messages"].to_list()
    assert tables["main"]["id"].to_list() == [row_id(m) for m in messages]


def test_extra_columns_of_every_json_type_by_columns(tmp_path, monkeypatch):
    def row(i):
        return {"prompt": f"p{i}", "response": "r", "grid": [[i, 2], [3]] if i % 2 else [],
                "holes": [i, None], "deep": {"a": [{"b": i}], "c": None, "": 1}, "flag": i % 2 == 0, "nothing": None,
                "clé \"x\"": "v", "when": f"2024-01-{i + 1:02d}", "nums": [1, 2.5] if i else [1],
                "score": i / 4 if i % 3 else i}

    write_jsonl(tmp_path / "d.jsonl", [row(i) for i in range(12)])
    _, tables = run_both(tmp_path, {"path": "d.jsonl"}, monkeypatch, most_by_rows=0)
    assert tables["main"].schema["when"] == pl.String and tables["main"].schema["score"] == pl.Float64


def test_mixed_types_in_an_extra_column(tmp_path, monkeypatch):
    rows = [good(i, x=v) for i, v in enumerate([1, "two", 3.5, None, True, 4])]
    write_jsonl(tmp_path / "d.jsonl", rows)
    _, tables = run_both(tmp_path, {"path": "d.jsonl"}, monkeypatch)
    assert tables["main"].height == 6


def test_a_key_that_only_rejected_rows_have_is_no_column(tmp_path, monkeypatch):
    # The JSON reader saw the rejected row: the good ones are read again without it.
    rows = [good(i) for i in range(10)] + [{"prompt": "", "response": "r", "only_here": 1, "n": 2.5}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    _, tables = run_both(tmp_path, {"path": "d.jsonl"}, monkeypatch, most_by_rows=1)
    assert "only_here" not in tables["main"].columns
    assert tables["main"].schema["n"] == pl.Int64


def test_key_order_of_rows_left_to_the_row_path(tmp_path, monkeypatch):
    # a seed of " 1" is for the row path, and its keys come in another order than the others'
    rows = [{"b": 1, "prompt": "p", "response": "r", "gen_seed": " 1", "a": 2}] + [
        {"prompt": "p", "response": f"r{i}", "a": 1, "b": 2} for i in range(5)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    _, tables = run_both(tmp_path, {"path": "d.jsonl"}, monkeypatch)
    assert tables["main"].columns[-2:] == ["b", "a"]


def test_column_order_across_the_json_readers_blocks(tmp_path, monkeypatch):
    """Keys that first appear late, in other orders, at the top and inside objects: the columns
    come in the order they first appear, across the JSON reader's own blocks as well."""
    import random

    monkeypatch.setattr(source, "_JSON_BLOCK_BYTES", 16 << 10)
    rng = random.Random(7)
    rows = []
    for i in range(1500):
        row = {"prompt": f"q{i} " + "w" * 400, "response": "a"}
        for key in rng.sample([f"k{j}" for j in range(8)], rng.randint(0, 3)) if rng.random() < 0.03 else []:
            row[key] = i
        if rng.random() < 0.05:
            row["obj"] = {f"f{j}": j for j in rng.sample(range(5), 2)}
        rows.append(row)
    write_jsonl(tmp_path / "d.jsonl", rows)
    _, tables = run_both(tmp_path, {"path": "d.jsonl"}, monkeypatch, most_by_rows=0)
    assert tables["main"].height == 1500


@pytest.mark.parametrize("limit", [1, 3, 12, 40, 1000])
def test_limit(tmp_path, monkeypatch, limit):
    monkeypatch.setattr(source, "_BLOCK_BYTES", 200)
    monkeypatch.setattr(source, "_TABLE_ROWS", 4)
    (tmp_path / "mixed.jsonl").write_bytes(b"".join(line(v) + b"\n" for v in MIXED))
    ctx, _ = run_both(tmp_path, {"path": "mixed.jsonl", "limit": limit, "allow_empty": True}, monkeypatch)
    assert ctx.stats["rows_in"] == min(limit, ctx.stats["rows_in"])

    folder = tmp_path / "shards"
    folder.mkdir(exist_ok=True)
    write_jsonl(folder / "a.jsonl", [good(i) for i in range(5)])
    (folder / "b.csv").write_text("prompt,response\nq1,a1\nq2,a2\n")
    pl.DataFrame({"prompt": ["x", "y"], "response": ["1", "2"]}).write_parquet(folder / "c.parquet")
    for fmt in ("jsonl", "csv", "parquet"):
        run_both(tmp_path, {"path": "shards", "format": fmt, "limit": limit}, monkeypatch, name=f"s{fmt}")


def test_raw_schema(tmp_path, monkeypatch):
    monkeypatch.setattr(source, "_BLOCK_BYTES", 300)
    (tmp_path / "mixed.jsonl").write_bytes(b"".join(line(v) + b"\n" for v in MIXED[:14]))
    run_both(tmp_path, {"path": "mixed.jsonl", "schema": "raw", "max_row_bytes": 500}, monkeypatch)
    write_jsonl(tmp_path / "plain.jsonl", [good(i, tags=[i], when="2024-01-01") for i in range(20)]
                + [b"{bad", b'  {"prompt": "p", "response": "r", "family": "f", "n": 1, "tags": [], "when": "x"}'])
    _, tables = run_both(tmp_path, {"path": "plain.jsonl", "schema": "raw"}, monkeypatch, name="plain")
    assert tables["main"].schema["when"] == pl.String

    frame = pl.DataFrame({"x": [1, 2, 3], "text": ["a", "b" * 300, "c"]}, schema={"x": pl.Int16, "text": pl.String})
    frame.write_parquet(tmp_path / "t.parquet")
    _, tables = run_both(tmp_path, {"path": "t.parquet", "schema": "raw", "max_row_bytes": 100}, monkeypatch,
                         name="t")
    assert tables["main"].schema["x"] == pl.Int16 and tables["rejected"]["line"].to_list() == [2]
    (tmp_path / "r.csv").write_text("n,text\n1,a\n2\n3,c\n")
    run_both(tmp_path, {"path": "r.csv", "schema": "raw"}, monkeypatch, name="r")


@pytest.mark.parametrize("table_rows", [65_536, 3])
def test_csv(tmp_path, monkeypatch, table_rows):
    monkeypatch.setattr(source, "_TABLE_ROWS", table_rows)
    (tmp_path / "d.csv").write_bytes(
        b"\xef\xbb\xbfprompt,response,system,gen_seed,gen_model,id,family\n"
        b"q1,a1,,5,m,x,f\n"
        b"q2,a2,be brief,,m,x,f\n"
        b"q3,a3, ,abc,m,x,f\n"
        b"q4,a4,,\xd9\xa3,m,x,f\n"
        b'"q5, with comma","multi\nline",,-3,m,x,f\n'
        b"q6,a6,,,m\n"
        b"\n"
        b"caf\xe9,a7,,,m,x,f\n"
        b",a8,,,m,x,f\n"
        b'q9,"a9 ""quoted""",,007,m,x,f\n'
        b"q10,a10,,1234567890123456789,m,x,f\n"
        b"q11,a11,,12345678901234567,m,x,f\n")
    run_both(tmp_path, {"path": "d.csv"}, monkeypatch)

    msgs = json.dumps(MSGS).replace('"', '""')
    (tmp_path / "m.csv").write_text(f'messages,k\n"{msgs}",1\n"[oops",2\n"{msgs}",3\n')
    run_both(tmp_path, {"path": "m.csv"}, monkeypatch, name="m")
    (tmp_path / "i.csv").write_text("instruction,input,output\nAdd,1 2,3\nSay hi,,hi\n")
    run_both(tmp_path, {"path": "i.csv"}, monkeypatch, name="i", most_by_rows=0)


@pytest.mark.parametrize("table_rows", [65_536, 2])
def test_parquet_types(tmp_path, monkeypatch, table_rows):
    import datetime
    import decimal

    monkeypatch.setattr(source, "_TABLE_ROWS", table_rows)
    n = 6
    frame = pl.DataFrame({
        "messages": [MSGS, [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}],
                     MSGS, None, MSGS, [{"role": "user", "content": "u" * 900}, {"role": "assistant", "content": "a"}]],
        "prompt": ["p"] * n, "response": ["r"] * n,
        "i8": pl.Series([1, 2, 3, 4, 5, 6], dtype=pl.Int8),
        "u64": pl.Series([1, 2, 3, 4, 5, 2**63 + 5], dtype=pl.UInt64),
        "f32": pl.Series([0.1, 0.2, None, 1.5, 2.5, 3.5], dtype=pl.Float32),
        "cat": pl.Series(["a", "b", "a", "b", "a", "b"], dtype=pl.Categorical),
        "date": [datetime.date(2024, 1, i + 1) for i in range(n)],
        "ns": pl.Series([datetime.datetime(2024, 1, 1, 0, 0, i) for i in range(n)]).cast(pl.Datetime("ns")),
        "dec": pl.Series([decimal.Decimal("1.50")] * n),
        "li": pl.Series([[1], [], None, [2, 3], [4], []], dtype=pl.List(pl.Int32)),
        "st": [{"a": i, "b": None} for i in range(n)],
        "nothing": pl.Series([None] * n, dtype=pl.String),
        "bin": [b"\x00\x01"] * n,
        "gen_seed": pl.Series([1.0, 2.0, 2.5, None, 4.0, 5.0], dtype=pl.Float64),
        "gen_model": pl.Series([1, 2, 3, 4, 5, 6], dtype=pl.Int16),
    })
    frame.write_parquet(tmp_path / "t.parquet")
    _, tables = run_both(tmp_path, {"path": "t.parquet", "max_row_bytes": 900}, monkeypatch)
    assert tables["rejected"]["line"].to_list() == [2, 3, 6]  # empty content, a seed of 2.5, oversized

    # A common table: messages with extras of the plain types.
    plain = pl.DataFrame({"messages": [MSGS] * 50, "category": ["c"] * 50,
                          "n": pl.Series(range(50), dtype=pl.Int32), "gen_seed": ["7"] * 50})
    plain.write_parquet(tmp_path / "plain.parquet")
    _, tables = run_both(tmp_path, {"path": "plain.parquet"}, monkeypatch, name="plain", most_by_rows=0)
    assert tables["main"].schema["n"] == pl.Int64 and tables["main"]["gen_seed"].to_list() == [7] * 50


def test_hf_disk(tmp_path, monkeypatch):
    import datasets

    rows = [{"conversations": [{"from": "human", "value": f"h{i}"}, {"from": "gpt", "value": "g" if i % 4 else ""}],
             "score": i * 0.5, "tags": [f"t{i}"]} for i in range(12)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    _, tables = run_both(tmp_path, {"path": "saved"}, monkeypatch, most_by_rows=3)
    assert tables["main"].height == 9 and tables["rejected"].height == 3


def test_every_row_rejected_fails_the_same_way(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}] * 3 + [b"{bad"])
    err, _ = run_both(tmp_path, {"path": "qa.jsonl"}, monkeypatch)
    assert "all 4 rows of qa.jsonl were rejected" in str(err)
    ctx, tables = run_both(tmp_path, {"path": "qa.jsonl", "allow_empty": True}, monkeypatch, name="allowed")
    assert tables["main"].height == 0 and ctx.stats["rejected"] == 4
    write_jsonl(tmp_path / "bad.jsonl", [b"{bad", b"[1]"])
    err, _ = run_both(tmp_path, {"path": "bad.jsonl", "schema": "raw", "allow_empty": True}, monkeypatch, name="r")
    assert isinstance(err, DatamillError) and "found no good row" in str(err)


def test_python_whitespace_is_str_isspace():
    assert PY_WHITESPACE == "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
