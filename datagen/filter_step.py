"""`filter`: drop rows that are too short or too long, refuse or recite AI boilerplate, or are
not in the expected language. Dropped rows go to `<name>__rejected` with the reason, e.g.

    too short: 0 < min_chars=1
    refusal phrase: 'as an ai'
    language 'de' != 'en' (p=0.99)

Each row gets the first reason that applies, checked in this order: response length, prompt
length, refusal phrases, language. Kept rows are written unchanged (same columns, same order).
Duplicates are the `dedup` step's job (exact and MinHash).

What is measured, for a `messages` column: response length = the assistant turns' contents
summed; prompt length = the user turns' contents summed; refusals are searched in assistant
turns; the language is detected on all turns joined. For a plain text column, length,
refusals and language all look at the whole text (prompt bounds need `messages`).
"""

from __future__ import annotations

import re
from functools import lru_cache

from pydantic import Field, model_validator

from datamill.errors import DatamillError, FieldError, did_you_mean
from datamill.step import Env, Step, StepConfig

# Phrases that mark a refusal or assistant boilerplate rather than an answer. Matched
# case-insensitively, as whole words, with curly apostrophes read as straight ones.
REFUSAL_PHRASES = (
    "as an ai",
    "as an ai language model",
    "as a language model",
    "as an artificial intelligence",
    "as a large language model",
    "i am an ai",
    "i'm an ai",
    "i'm just an ai",
    "i am just an ai",
    "i cannot help with",
    "i can't help with",
    "i cannot assist with",
    "i can't assist with",
    "i'm sorry, but i can't",
    "i'm sorry, but i cannot",
    "i am sorry, but i cannot",
    "i am sorry, but i can't",
    "i'm unable to help",
    "i am unable to help",
    "i'm unable to assist",
    "i am unable to assist",
    "i'm not able to help",
    "i am not able to help",
    "i cannot fulfill",
    "i can't fulfill",
    "i cannot comply",
    "i can't comply",
    "i won't be able to help",
    "i must decline",
    "my knowledge cutoff",
    "i don't have personal opinions",
    "i do not have personal opinions",
    "i don't have the ability to",
    "i do not have the ability to",
    "it is not appropriate for me",
    "it's not appropriate for me",
    "against my programming",
    "openai's content policy",
)
LANGUAGE_MIN_CHARS = 20  # langdetect guesses wildly on a few words: shorter texts are not checked
LANGDETECT_SEED = 0


class FilterConfig(StepConfig):
    """Drop rows by length, refusal/boilerplate phrases and language; the dropped rows and why go
    to `<name>__rejected`."""

    input: str
    """Table to filter."""
    column: str | None = None
    """Column holding the text; default `messages` if present, else `text`. With `messages` the
    lengths and refusals look at the assistant turns; with a text column at the whole text."""
    min_chars: int | None = Field(1, ge=0)
    """Fewest characters in the response (assistant turns summed, or the whole text); null: no bound.
    The default 1 drops rows with an empty response."""
    max_chars: int | None = Field(None, ge=0)
    """Most characters in the response (assistant turns summed, or the whole text); null: no bound."""
    min_prompt_chars: int | None = Field(None, ge=0)
    """Fewest characters in the prompt (user turns summed); needs a `messages` column."""
    max_prompt_chars: int | None = Field(None, ge=0)
    """Most characters in the prompt (user turns summed); needs a `messages` column."""
    refusals: bool = True
    """Drop responses containing a shipped refusal/boilerplate phrase ("As an AI", "as a language
    model", "I cannot help with", "I'm sorry, but I can't", ...): case-insensitive, whole words."""
    extra_phrases: list[str] = []
    """More phrases to drop responses for (checked whether or not `refusals` is on)."""
    language: str | None = None
    """Keep only rows whose text `langdetect` reads as this language (ISO 639-1 code such as `en`,
    `de`, or `zh-cn`). Texts shorter than `min_language_chars` are kept without a check."""
    min_language_chars: int = Field(LANGUAGE_MIN_CHARS, ge=1)
    """Texts shorter than this (stripped) are not language-checked: detection on a few words is a guess."""

    @model_validator(mode="after")
    def _bounds_in_order(self):
        for low, high in (("min_chars", "max_chars"), ("min_prompt_chars", "max_prompt_chars")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"{low}={lo} is larger than {high}={hi}: no row could pass")
        return self


class FilterStep(Step):
    """Keep rows that pass length, refusal and language checks; reject the others with a reason."""

    kind = "filter"
    Config = FilterConfig
    side_tables = ("rejected",)

    def input_tables(self):
        return [(("input",), self.config.input)]

    def check(self, env: Env) -> None:
        language = self.config.language
        if language is not None:
            known = langdetect_languages()
            if known and language not in known:
                raise FieldError("language", f"langdetect has no language '{language}'"
                                             f"{did_you_mean(language, known)} (known: {', '.join(known)})")
        for phrase in self.config.extra_phrases:
            if not _normalize(phrase):
                raise FieldError("extra_phrases", "a phrase is empty")

    def key_material(self, env: Env) -> dict:
        """The shipped phrase list and the langdetect version decide the output too."""
        from importlib.metadata import PackageNotFoundError, version

        from datamill.hashing import hash_obj

        material = {}
        if self.config.refusals:
            material["phrases"] = hash_obj(REFUSAL_PHRASES)
        if self.config.language is not None:
            try:
                material["langdetect"] = version("langdetect")
            except PackageNotFoundError:
                material["langdetect"] = None
            material["langdetect_seed"] = LANGDETECT_SEED
        return material

    def run(self, ctx) -> None:
        import polars as pl

        from datamill.progress import bar

        cfg = self.config
        phrases = refusal_pattern(tuple(REFUSAL_PHRASES if cfg.refusals else ()) + tuple(cfg.extra_phrases))
        detector = LanguageDetector() if cfg.language else None
        rows_in = ctx.input_rows(cfg.input)
        by_kind: dict[str, int] = {}
        # Row by row, a batch at a time: memory holds one batch whatever the table's size.
        with ctx.writer() as kept, ctx.writer("rejected") as rejected, \
                bar(f"{ctx.name}: filter", total=rows_in) as progress:
            for table in ctx.read_batches(cfg.input):
                responses, prompts, whole = self._texts(table)
                reasons = [self._reason(responses[i], None if prompts is None else prompts[i], whole[i],
                                        phrases, detector) for i in range(table.height)]
                dropped = pl.Series([r is not None for r in reasons], dtype=pl.Boolean)
                kept.write(table.filter(~dropped))
                rejected.write(table.filter(dropped).with_columns(
                    pl.Series("reason", [r for r in reasons if r is not None], dtype=pl.String)))
                for reason in reasons:
                    if reason is not None:
                        by_kind[reason_kind(reason)] = by_kind.get(reason_kind(reason), 0) + 1
                progress.advance(table.height)
        ctx.stats.update({"rows_in": rows_in, "kept": kept.rows, "rejected": rejected.rows,
                          "rejected_by_reason": dict(sorted(by_kind.items()))})

    def _reason(self, response: list[str], prompt: list[str] | None, whole: str, phrases, detector) -> str | None:
        """Why a row is dropped (the first check it fails), or None to keep it."""
        cfg = self.config
        reason = _length_reason(response, cfg.min_chars, cfg.max_chars, "", "chars")
        if reason is None and prompt is not None:
            reason = _length_reason(prompt, cfg.min_prompt_chars, cfg.max_prompt_chars, "prompt ", "prompt_chars")
        if reason:
            return reason
        if phrases is not None:
            for text in response:
                found = phrases.search(_normalize(text))
                if found:
                    return f"refusal phrase: '{found.group(1)}'"
        if detector is not None and len(whole.strip()) >= cfg.min_language_chars:
            detected = detector.detect(whole)
            if detected is not None and detected[0] != cfg.language:
                return f"language '{detected[0]}' != '{cfg.language}' (p={detected[1]:.2f})"
        return None

    def _texts(self, table):
        """Per row: response texts, prompt texts (None for a text column) and the whole text."""
        from datamill.records import column_texts, is_messages_column, text_column, text_of

        cfg = self.config
        column = text_column(table, cfg.column, f"filter input '{cfg.input}'")
        if is_messages_column(table, column):
            turns = [v or [] for v in table[column].to_list()]
            responses = [[m["content"] or "" for m in t if m.get("role") == "assistant"] for t in turns]
            prompts = [[m["content"] or "" for m in t if m.get("role") == "user"] for t in turns]
            return responses, prompts, [text_of(t) for t in turns]
        if cfg.min_prompt_chars is not None or cfg.max_prompt_chars is not None:
            raise DatamillError(f"min_prompt_chars/max_prompt_chars need a messages column; '{column}' is "
                                f"{table.schema[column]}: there is no prompt to measure")
        whole = column_texts(table, column)
        return [[t] for t in whole], None, whole


def _length_reason(texts: list[str], low: int | None, high: int | None, label: str, field: str) -> str | None:
    size = sum(len(t) for t in texts)
    if low is not None and size < low:
        return f"{label}too short: {size} < min_{field}={low}"
    if high is not None and size > high:
        return f"{label}too long: {size} > max_{field}={high}"
    return None


def reason_kind(reason: str) -> str:
    """The kind of a reason, for counting: 'too short', 'refusal phrase', 'language', ..."""
    return "language" if reason.startswith("language ") else reason.split(":", 1)[0]


def _normalize(text: str) -> str:
    """Lowercase, curly apostrophes straight, runs of whitespace one space."""
    return " ".join(text.replace("\u2019", "'").replace("\u2018", "'").lower().split())


@lru_cache(maxsize=8)
def refusal_pattern(phrases: tuple[str, ...]):
    """One regex for all phrases (longest first, whole words), or None when there are none."""
    normalized = sorted(dict.fromkeys(p for p in map(_normalize, phrases) if p), key=len, reverse=True)
    if not normalized:
        return None
    return re.compile(r"(?<!\w)(" + "|".join(re.escape(p) for p in normalized) + r")(?!\w)")


def langdetect_languages() -> list[str]:
    """Language codes langdetect ships profiles for, found without importing it ([] if absent)."""
    from importlib.util import find_spec
    from pathlib import Path

    spec = find_spec("langdetect")
    if spec is None or not spec.submodule_search_locations:
        return []
    profiles = Path(list(spec.submodule_search_locations)[0]) / "profiles"
    return sorted(p.name for p in profiles.iterdir()) if profiles.is_dir() else []


class LanguageDetector:
    """langdetect with its own factory and a fixed seed, so results repeat run after run
    (langdetect samples n-grams at random) without touching its global state."""

    def __init__(self, seed: int = LANGDETECT_SEED):
        self.factory = _langdetect_factory()
        self.seed = seed

    def detect(self, text: str) -> tuple[str, float] | None:
        """(language, probability) of the most likely language, or None when langdetect finds no
        usable features (digits and punctuation only)."""
        from langdetect.lang_detect_exception import LangDetectException

        self.factory.set_seed(self.seed)
        detector = self.factory.create()
        detector.append(text)
        try:
            best = detector.get_probabilities()
        except LangDetectException:
            return None
        return (best[0].lang, best[0].prob) if best else None


@lru_cache(maxsize=1)
def _langdetect_factory():
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    return factory
