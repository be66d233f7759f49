"""Streaming tables: a step writes batch by batch and reads in batches, with the same table as
writing it whole."""

import polars as pl
import pytest

from datamill.step import TableWriter, parquet_batches


def test_parts_join_into_one_table_in_order_with_widened_columns(tmp_path):
    path = tmp_path / "main.parquet"
    with TableWriter(path) as out:
        out.write(pl.DataFrame({"a": [1, 2], "b": ["x", "y"]}))
        out.write(pl.DataFrame({"a": [1], "b": ["z"]}).head(0))  # an empty batch changes nothing
        out.write(pl.DataFrame({"a": [3.5], "c": [True]}))
    got = pl.read_parquet(path)
    expected = pl.concat([pl.DataFrame({"a": [1, 2], "b": ["x", "y"]}), pl.DataFrame({"a": [3.5], "c": [True]})],
                         how="diagonal_relaxed")
    assert got.equals(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["main.parquet"]  # the parts are gone
    assert out.rows == 3


def test_batches_read_back_what_was_written(tmp_path):
    path = tmp_path / "main.parquet"
    frames = [pl.DataFrame({"i": list(range(k * 10, k * 10 + 10)), "t": [f"row {k}"] * 10}) for k in range(5)]
    with TableWriter(path) as out:
        for frame in frames:
            out.write(frame)
    batches = list(parquet_batches(path, rows=16))
    assert all(b.height <= 16 for b in batches)
    assert pl.concat(batches).equals(pl.concat(frames))
    assert list(parquet_batches(path, columns=["i"], rows=100))[0].columns == ["i"]


def test_a_failed_block_leaves_no_table_and_no_parts(tmp_path):
    path = tmp_path / "main.parquet"
    with pytest.raises(RuntimeError):
        with TableWriter(path) as out:
            out.write(pl.DataFrame({"a": [1]}))
            raise RuntimeError("the step failed")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_table_keeps_its_columns(tmp_path):
    path = tmp_path / "main.parquet"
    with TableWriter(path) as out:
        out.write(pl.DataFrame(schema={"id": pl.String, "n": pl.Int64}))
    assert pl.read_parquet(path).schema == pl.Schema({"id": pl.String, "n": pl.Int64})
    batches = list(parquet_batches(path))  # no rows: one empty batch with the columns
    assert len(batches) == 1 and batches[0].height == 0 and batches[0].columns == ["id", "n"]
    with pytest.raises(ValueError, match="no batch"):
        TableWriter(tmp_path / "other.parquet").close()
