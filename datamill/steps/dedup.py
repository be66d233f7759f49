"""`dedup`: drop exact and near duplicates, keeping the first row of each cluster in input order.

Exact: rows whose text is equal after NFKC, lowercasing and collapsing whitespace.
Near (MinHash): word n-gram shingles -> MinHash sketches -> an LSH index of the rows kept so
far. Each row queries the index before it is inserted, so it is only ever compared with kept
rows, and an LSH candidate counts only if the MinHash Jaccard estimate reaches the threshold.
Removed rows go to `<name>__removed` with `duplicate_of`, `method` and `similarity`.
"""

from __future__ import annotations

import hashlib
import unicodedata

from pydantic import Field, field_validator

from datamill.step import Step, StepConfig, optional_section

_PROGRESS_EVERY = 1000  # rows between progress updates


class MinhashConfig(StepConfig):
    """Near-duplicate detection with MinHash LSH over word n-grams."""

    threshold: float = Field(0.85, gt=0, le=1)
    """Estimated Jaccard similarity of the n-gram sets at or above which a row is a near duplicate.
    One word changed in the middle of a 20-word text gives about 0.7 with 3-grams."""
    num_perm: int = Field(128, ge=8)
    """Number of MinHash permutations: more is more precise and slower."""
    ngram: int = Field(3, ge=1)
    """Words per shingle; texts shorter than this are one shingle (the whole text)."""
    seed: int = 1
    """Seed of the MinHash permutations."""


class DedupConfig(StepConfig):
    """Remove exact and/or near-duplicate rows of a table."""

    input: str
    """Table to deduplicate."""
    exact: bool = True
    """Remove rows whose normalised text (NFKC, lowercase, whitespace collapsed) was seen before."""
    minhash: MinhashConfig | None = None
    """Also remove near duplicates (`minhash: {threshold: 0.85}`; `minhash: true` for defaults)."""
    column: str | None = None
    """Text column to compare; default `messages` (contents joined by newlines) if present, else `text`."""

    @field_validator("minhash", mode="before")
    @classmethod
    def _minhash_shorthand(cls, value):
        return optional_section(value)


class DedupStep(Step):
    """Keep the first row of each exact or near-duplicate cluster; log what was removed and why."""

    kind = "dedup"
    Config = DedupConfig
    side_tables = ("removed",)

    def input_tables(self):
        return [(("input",), self.config.input)]

    def run(self, ctx) -> None:
        import polars as pl

        cfg = self.config
        table = ctx.read(cfg.input)
        texts = [normalize_text(t) for t in self._texts(table)]
        n = table.height
        # Per row: index of the kept row it duplicates (None = kept), how found, how similar.
        target: list[int | None] = [None] * n
        method: list[str | None] = [None] * n
        similarity: list[float | None] = [None] * n

        if cfg.exact:
            find_exact(texts, target, method, similarity, f"{ctx.name}: exact dedup")
        if cfg.minhash is not None:
            find_near(texts, cfg.minhash, target, method, similarity, f"{ctx.name}: minhash dedup")
            # An exact copy of a row that minhash removed duplicates what that row duplicated.
            for i in range(n):
                j = target[i]
                if method[i] == "exact" and target[j] is not None:
                    target[i], method[i], similarity[i] = target[j], method[j], similarity[j]

        removed = pl.Series([t is not None for t in target], dtype=pl.Boolean)
        labels = (table["id"].cast(pl.String).to_list() if "id" in table.columns
                  else [str(i) for i in range(n)])
        removed_rows = table.filter(removed).with_columns(
            pl.Series("duplicate_of", [labels[t] for t in target if t is not None], dtype=pl.String),
            pl.Series("method", [m for m in method if m is not None], dtype=pl.String),
            pl.Series("similarity", [s for s in similarity if s is not None], dtype=pl.Float64),
        )
        kept = table.filter(~removed)
        ctx.write(kept)
        ctx.write(removed_rows, "removed")
        ctx.stats.update({"rows_in": n, "kept": kept.height,
                          "removed_exact": method.count("exact"), "removed_minhash": method.count("minhash")})

    def _texts(self, table) -> list[str]:
        from datamill.records import column_texts, text_column

        column = text_column(table, self.config.column, f"dedup input '{self.config.input}'")
        return column_texts(table, column)


def normalize_text(text: str) -> str:
    """What 'the same text' means: NFKC, lowercase, runs of whitespace -> one space."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def shingles(text: str, ngram: int) -> list[bytes]:
    """Word n-grams of a normalised text; a text shorter than n words is one shingle."""
    words = text.split(" ")
    if len(words) < ngram:
        return [text.encode("utf-8")]
    return [" ".join(words[i:i + ngram]).encode("utf-8") for i in range(len(words) - ngram + 1)]


def find_exact(texts: list[str], target, method, similarity, desc: str) -> None:
    """Mark every row whose normalised text appeared earlier as an exact duplicate of the first."""
    from datamill.progress import bar

    first_with: dict[bytes, int] = {}
    with bar(desc, total=len(texts)) as progress:
        for i, text in enumerate(texts):
            # A 16-byte digest instead of the text itself keeps the index small for long texts.
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            first = first_with.setdefault(key, i)
            if first != i:
                target[i], method[i], similarity[i] = first, "exact", 1.0
            if (i + 1) % _PROGRESS_EVERY == 0:
                progress.advance(_PROGRESS_EVERY)
        progress.advance(len(texts) % _PROGRESS_EVERY)


def find_near(texts: list[str], cfg: MinhashConfig, target, method, similarity, desc: str) -> None:
    """Mark rows (not already removed) whose MinHash Jaccard with an earlier kept row reaches the threshold."""
    from datasketch import MinHash

    from datamill.progress import bar

    rows = [i for i in range(len(texts)) if target[i] is None]
    # One generator shares the permutations across all sketches (datasketch's bulk path).
    sketches = MinHash.generator((shingles(texts[i], cfg.ngram) for i in rows),
                                 num_perm=cfg.num_perm, seed=cfg.seed)
    index = lsh_index(cfg.threshold, cfg.num_perm)
    kept_sketches: dict[int, MinHash] = {}
    with bar(desc, total=len(rows)) as progress:
        for done, (i, sketch) in enumerate(zip(rows, sketches), 1):
            best, best_similarity = None, -1.0
            for candidate in index.query(sketch):  # query before insert: compare with kept rows only
                estimate = sketch.jaccard(kept_sketches[candidate])
                if estimate >= cfg.threshold and (estimate > best_similarity or
                                                  (estimate == best_similarity and candidate < best)):
                    best, best_similarity = candidate, estimate
            if best is None:
                index.insert(i, sketch)
                kept_sketches[i] = sketch
            else:
                target[i], method[i], similarity[i] = best, "minhash", float(best_similarity)
            if done % _PROGRESS_EVERY == 0:
                progress.advance(_PROGRESS_EVERY)
        progress.advance(len(rows) % _PROGRESS_EVERY)


def lsh_index(threshold: float, num_perm: int):
    """A MinHashLSH index for `threshold`, or for the nearest lower one datasketch can build.

    For thresholds near 1 (or few permutations) datasketch's optimum is a single band, which it
    refuses. An index tuned for a slightly lower threshold returns a superset of the candidates,
    and every candidate is still confirmed against the real threshold, so the result is the same.
    """
    from datasketch import MinHashLSH

    index_threshold = threshold
    while True:
        try:
            return MinHashLSH(threshold=index_threshold, num_perm=num_perm)
        except ValueError:
            if index_threshold <= 0.05:
                raise
            index_threshold = round(index_threshold - 0.01, 2)
