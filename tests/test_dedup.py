"""The `dedup` step: exact duplicates after normalisation, MinHash near duplicates."""

from __future__ import annotations

import random

import polars as pl
import pydantic
import pytest
from helpers_steps import run_step

from datamill.errors import DatamillError
from datamill.records import normalize_record
from datamill.steps.dedup import DedupStep, normalize_text, shingles


def instruction_table(pairs: list[tuple[str, str]]) -> pl.DataFrame:
    rows = [normalize_record({"prompt": p, "response": r}, "test") for p, r in pairs]
    return pl.DataFrame(rows, schema_overrides={"gen_seed": pl.Int64})


def run_dedup(tmp_path, table: pl.DataFrame, **config):
    return run_step(DedupStep, {"input": "pool", **config}, tmp_path, name="clean", inputs={"pool": table})


def crafted_sentences(seed: int = 0):
    """20 sentences of 20 words each from disjoint vocabularies (so unrelated rows share no
    shingles), near-copies of 5 of them with one middle word changed, and 10 unrelated rows."""
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(2000)]
    rng.shuffle(vocabulary)
    originals = [" ".join(vocabulary[i * 20:(i + 1) * 20]) for i in range(20)]
    near = {}
    for k, original in enumerate(originals[:5]):
        words = original.split()
        words[10] = f"changed{k}"
        near[k] = " ".join(words)
    unrelated = [" ".join(vocabulary[400 + i * 20:400 + (i + 1) * 20]) for i in range(10)]
    return originals, near, unrelated


def test_normalize_text_and_shingles():
    assert normalize_text("  Ｈello\tWORLD \n") == "hello world"
    assert shingles("a b c d", 3) == [b"a b c", b"b c d"]
    assert shingles("a b", 3) == [b"a b"]


def test_exact_dedup_on_case_and_whitespace_variants(tmp_path):
    table = instruction_table([
        ("What is 2+2?", "4"),
        ("what is  2+2?", "4"),          # case + whitespace variant of row 0
        ("Name a colour.", "Blue."),
        ("WHAT IS 2+2?\n", "4 "),         # another variant of row 0
        ("Name a colour", "Blue."),       # punctuation differs: not an exact duplicate
    ])
    ctx, tables = run_dedup(tmp_path, table)
    kept, removed = tables["main"], tables["removed"]
    assert kept["id"].to_list() == table["id"][[0, 2, 4]].to_list()
    assert kept.columns == table.columns
    assert removed["id"].to_list() == table["id"][[1, 3]].to_list()
    assert removed["duplicate_of"].to_list() == [table["id"][0]] * 2
    assert removed["method"].to_list() == ["exact", "exact"]
    assert removed["similarity"].to_list() == [1.0, 1.0]
    assert ctx.stats == {**ctx.stats, "rows_in": 5, "kept": 3, "removed_exact": 2, "removed_minhash": 0}


def test_minhash_removes_exactly_the_near_copies(tmp_path):
    originals, near, unrelated = crafted_sentences()
    texts = originals + list(near.values()) + unrelated
    table = pl.DataFrame({"text": texts, "tag": list(range(len(texts)))})
    ctx, tables = run_dedup(tmp_path, table, minhash={"threshold": 0.5})

    removed = tables["removed"]
    assert sorted(removed["text"].to_list()) == sorted(near.values())
    # No `id` column: duplicate_of is the row index of the kept original.
    assert dict(zip(removed["text"], removed["duplicate_of"])) == {near[k]: str(k) for k in near}
    assert removed["method"].unique().to_list() == ["minhash"]
    assert all(0.5 <= s < 1.0 for s in removed["similarity"])
    assert tables["main"]["text"].to_list() == originals + unrelated
    assert ctx.stats["removed_minhash"] == 5 and ctx.stats["removed_exact"] == 0


def test_minhash_on_messages_uses_ids(tmp_path):
    originals, near, _ = crafted_sentences(seed=1)
    table = instruction_table([(t, "ok") for t in originals[:6]] + [(near[2], "ok")])
    _, tables = run_dedup(tmp_path, table, exact=False, minhash={"threshold": 0.5})
    assert tables["removed"]["duplicate_of"].to_list() == [table["id"][2]]
    assert tables["main"].height == 6


def test_threshold_one_removes_only_exact_copies(tmp_path):
    originals, near, unrelated = crafted_sentences(seed=2)
    texts = originals + list(near.values()) + [originals[7].upper(), "  " + originals[9]] + unrelated
    table = pl.DataFrame({"text": texts})
    _, tables = run_dedup(tmp_path, table, exact=False, minhash={"threshold": 1.0})
    removed = tables["removed"]
    assert removed["text"].to_list() == [originals[7].upper(), "  " + originals[9]]
    assert removed["duplicate_of"].to_list() == ["7", "9"]
    assert removed["similarity"].to_list() == [1.0, 1.0]


def test_exact_copy_of_a_near_duplicate_points_to_the_kept_row(tmp_path):
    originals, near, _ = crafted_sentences(seed=3)
    texts = [originals[0], near[0], near[0].upper(), originals[1]]
    _, tables = run_dedup(tmp_path, pl.DataFrame({"text": texts}), minhash={"threshold": 0.5})
    removed = tables["removed"]
    assert removed["duplicate_of"].to_list() == ["0", "0"]
    assert removed["method"].to_list() == ["minhash", "minhash"]


def test_named_column_and_missing_column(tmp_path):
    table = pl.DataFrame({"body": ["Hello there", "hello  THERE", "bye"]})
    _, tables = run_dedup(tmp_path, table, column="body")
    assert tables["main"]["body"].to_list() == ["Hello there", "bye"]

    with pytest.raises(DatamillError, match="no column 'text'.*available columns: body"):
        run_dedup(tmp_path, table)


@pytest.mark.parametrize("config", [{"input": "t", "minhash": {"threshold": 0}},
                                    {"input": "t", "minhash": {"threshold": 1.5}},
                                    {"input": "t", "minhash": {"ngram": 0}},
                                    {"input": "t", "exactly": True}])
def test_config_errors(config):
    with pytest.raises(pydantic.ValidationError):
        DedupStep.Config.model_validate(config)


def test_minhash_shorthand_and_input_tables():
    step = DedupStep("clean", DedupStep.Config.model_validate({"input": "pool", "minhash": True}))
    assert step.config.minhash.threshold == 0.85
    assert step.input_tables() == [(("input",), "pool")]
