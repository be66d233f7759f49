"""The `filter` step: length bounds, refusal phrases, language; kept rows untouched, reasons given."""

from __future__ import annotations

import polars as pl
import pydantic
import pytest
from helpers_steps import run_step

from datagen.filter_step import FilterStep, reason_kind
from datamill.errors import DatamillError, FieldError
from datamill.records import records_frame, row_id

ENGLISH = "The weather was lovely this morning, so we walked along the river to the old stone bridge."
GERMAN = "Das Wetter war heute Morgen herrlich, also sind wir am Fluss entlang zur alten Steinbrücke gelaufen."


def table(pairs: list[tuple[str, str]], **extra) -> pl.DataFrame:
    """Canonical rows from (prompt, response) pairs; empty responses allowed (to be filtered)."""
    rows = []
    for i, (prompt, response) in enumerate(pairs):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        rows.append({"id": row_id(messages), "messages": messages, "source": "t", "gen_prompt": None,
                     "gen_model": None, "gen_seed": None, "parent_id": None, "n": i,
                     **{k: v[i] for k, v in extra.items()}})
    return records_frame(rows)


def run_filter(tmp_path, frame: pl.DataFrame, **config):
    ctx, tables = run_step(FilterStep, {"input": "pool", **config}, tmp_path, name="clean", inputs={"pool": frame})
    return ctx, tables["main"], tables["rejected"]


def reasons(rejected: pl.DataFrame) -> dict[int, str]:
    return dict(zip(rejected["n"].to_list(), rejected["reason"].to_list()))


def test_each_reason_and_kept_rows_untouched(tmp_path):
    frame = table([
        ("What is 2 + 2?", "4"),                                                  # 0 kept
        ("Say nothing.", ""),                                                     # 1 too short (default min 1)
        ("Write an essay.", "word " * 100),                                       # 2 too long
        ("Hi", "Hello! How can I help?"),                                         # 3 prompt too short
        ("Tell me a joke.", "As an AI, I don't tell jokes."),                     # 4 refusal
        ("Help me.", "I\u2019m sorry, but I can\u2019t do that."),                # 5 curly apostrophes
        ("Who flies planes?", "Pilots, and a crew trained as an airline team."),  # 6 kept: 'as an ai' not a word here
        ("Quote a refusal.", "OK."),                                              # 7 kept
    ], tag=list("abcdefgh"))
    ctx, kept, rejected = run_filter(tmp_path, frame, max_chars=200, min_prompt_chars=3)
    assert reasons(rejected) == {
        1: "too short: 0 < min_chars=1",
        2: "too long: 500 > max_chars=200",
        3: "prompt too short: 2 < min_prompt_chars=3",
        4: "refusal phrase: 'as an ai'",
        5: "refusal phrase: 'i'm sorry, but i can't'",
    }
    # kept rows: same columns, dtypes, values and order as the input
    assert kept.equals(frame.filter(pl.col("n").is_in([0, 6, 7])))
    assert rejected.drop("reason").equals(frame.filter(pl.col("n").is_in([1, 2, 3, 4, 5])))
    assert ctx.stats["rejected_by_reason"] == {"prompt too short": 1, "refusal phrase": 2, "too long": 1,
                                               "too short": 1}
    assert ctx.stats["kept"] == 3 and ctx.stats["rejected"] == 5


def test_refusals_only_in_assistant_turns_and_switchable(tmp_path):
    frame = table([("As an AI, what do you think?", "I think it is fine."),
                   ("Answer me.", "As a language model I cannot browse."),
                   ("Plan a trip.", "Pack light and bring sunscreen.")])
    _, kept, rejected = run_filter(tmp_path / "a", frame)
    assert kept["n"].to_list() == [0, 2]
    assert reasons(rejected) == {1: "refusal phrase: 'as a language model'"}
    _, kept, _ = run_filter(tmp_path / "b", frame, refusals=False)
    assert kept.height == 3
    _, kept, rejected = run_filter(tmp_path / "c", frame, refusals=False, extra_phrases=["Sunscreen"])
    assert reasons(rejected) == {2: "refusal phrase: 'sunscreen'"}


def test_max_prompt_chars_and_no_bounds(tmp_path):
    frame = table([("x" * 50, "ok"), ("short", ""), ("tiny", "fine")])
    _, kept, rejected = run_filter(tmp_path, frame, min_chars=None, max_prompt_chars=10)
    assert kept["n"].to_list() == [1, 2]
    assert reasons(rejected) == {0: "prompt too long: 50 > max_prompt_chars=10"}


def test_language_check_is_deterministic_and_skips_short_texts(tmp_path):
    frame = table([("Tell me about your morning.", ENGLISH),
                   ("Erzähl mir von deinem Morgen.", GERMAN),
                   ("Danke!", "Bitte sehr."),  # German but shorter than 20 characters: not checked
                   ("12 + 30", "42")])
    _, kept, rejected = run_filter(tmp_path / "a", frame, language="en")
    assert kept["n"].to_list() == [0, 2, 3]
    (reason,) = rejected["reason"].to_list()
    assert reason.startswith("language 'de' != 'en' (p=") and reason_kind(reason) == "language"
    again = run_filter(tmp_path / "b", frame, language="en")
    assert again[2]["reason"].to_list() == [reason]
    _, kept, rejected = run_filter(tmp_path / "c", frame, language="de")
    assert rejected["n"].to_list() == [0] and rejected["reason"][0].startswith("language 'en' != 'de'")


def test_text_column(tmp_path):
    frame = pl.DataFrame({"text": ["As an AI I can't.", "A plain, useful sentence.", ""], "n": [0, 1, 2]})
    _, kept, rejected = run_filter(tmp_path / "a", frame)
    assert kept["n"].to_list() == [1]
    assert reasons(rejected) == {0: "refusal phrase: 'as an ai'", 2: "too short: 0 < min_chars=1"}
    with pytest.raises(DatamillError, match="need a messages column"):
        run_filter(tmp_path / "b", frame, min_prompt_chars=5)
    with pytest.raises(DatamillError, match="no column 'body'"):
        run_filter(tmp_path / "c", frame, column="body")


def test_config_errors(tmp_path):
    with pytest.raises(pydantic.ValidationError, match="min_chars=10 is larger than max_chars=5"):
        FilterStep.Config.model_validate({"input": "x", "min_chars": 10, "max_chars": 5})
    with pytest.raises(FieldError) as err:
        run_filter(tmp_path, table([("a", "b")]), language="eng")
    assert err.value.loc == ("language",) and "did you mean 'en'" in err.value.message


def test_empty_input(tmp_path):
    ctx, kept, rejected = run_filter(tmp_path, table([]).with_columns(pl.lit(0).alias("n")), language="en")
    assert kept.height == 0 and rejected.height == 0 and "reason" in rejected.columns


def test_key_follows_phrases_and_langdetect(tmp_path):
    from datamill.step import Env

    def key(**config):
        return FilterStep("f", FilterStep.Config.model_validate({"input": "x", **config})).key_material(Env(tmp_path))

    assert "phrases" in key() and "phrases" not in key(refusals=False)
    assert key(language="en")["langdetect"] and "langdetect" not in key()


def test_batches_give_the_same_tables_as_one_pass(tmp_path, monkeypatch):
    """The step streams its input a batch at a time: tiny batches give the same kept and
    rejected tables, in input order, and the same counts."""
    import datamill.step

    frame = table([(f"question {i}", "" if i % 4 == 0 else ("As an AI, I cannot" if i % 5 == 0 else f"answer {i}"))
                   for i in range(40)])
    ctx_one, kept_one, rejected_one = run_filter(tmp_path / "one", frame)
    monkeypatch.setattr(datamill.step, "BATCH_ROWS", 3)
    ctx_many, kept_many, rejected_many = run_filter(tmp_path / "many", frame)
    assert kept_many.equals(kept_one) and rejected_many.equals(rejected_one)
    assert kept_one.height + rejected_one.height == 40 and rejected_one.height > 10
    assert ctx_many.stats == ctx_one.stats
