"""Functions for the `polars` steps of the examples: each takes and returns a DataFrame."""

import polars as pl


def add_lengths(df: pl.DataFrame) -> pl.DataFrame:
    """Add prompt/response lengths in characters (first user turn, last assistant turn)."""
    user = df["messages"].list.eval(pl.element().filter(pl.element().struct.field("role") == "user"))
    assistant = df["messages"].list.eval(pl.element().filter(pl.element().struct.field("role") == "assistant"))
    return df.with_columns(
        prompt_chars=user.list.first().struct.field("content").str.len_chars(),
        response_chars=assistant.list.last().struct.field("content").str.len_chars(),
    )


def keep_short(df: pl.DataFrame, max_chars: int = 200) -> pl.DataFrame:
    """Keep rows whose response is at most `max_chars` characters."""
    return add_lengths(df).filter(pl.col("response_chars") <= max_chars)
