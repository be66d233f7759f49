"""`dedup`: drop exact and near duplicates, keeping the first row of each cluster in input order.

Exact: rows whose text is equal after NFKC, lowercasing and collapsing whitespace.
Near (MinHash): word n-gram shingles -> a MinHash signature -> LSH bands. A row is compared only
with the rows kept before it that share a band with it, and such a candidate counts only if the
MinHash Jaccard estimate reaches the threshold; the best (highest, then earliest) one wins.
Removed rows go to `<name>__removed` with `duplicate_of`, `method` and `similarity`.

How it runs, on the executor's shards (Ray tasks with `executor: ray`: the way datatrove and NeMo
Curator spread MinHash dedup, by LSH band):
1. row shards, one streamed batch of the input each: normalised texts -> exact digests, signatures
   (numpy: shingles hashed from their UTF-8 bytes, then `num_perm` minima) and a key per band;
2. band shards, one LSH band each: the rows that share their key with another row (buckets);
3. here, in input order: a row's candidates are the kept rows of its buckets, confirmed by the
   estimate. These are the decisions of a sequential query-before-insert LSH with the same bands.
Memory holds per row a digest and the decisions, never the texts: the signatures (num_perm x 4
bytes a row) and band keys go to a file in the step's state folder, read back one band at a time
and only for the rows that share a bucket. The kept and removed rows are written batch by batch in
a second streamed pass.

Why numpy and not rensa for the signatures: rensa computes them fast in Rust but hands them back
only as Python lists of ints, which costs more than computing them here, and its LSH index cannot
be split by band. The permutations x -> a x + b (mod 2^32) of 32-bit shingle hashes estimate
Jaccard with the spread of independent permutations (datasketch's; measured on the scale corpus).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import tempfile
import unicodedata
from pathlib import Path

from pydantic import Field, field_validator

from datamill.step import Step, StepConfig, optional_section

_CHUNK_ROWS = 8192  # rows of a shard whose texts are made at once
_PIECE_BYTES = 1 << 20  # text hashed at once: its numpy temporaries (~20 bytes a byte) stay small
_BLOCK_SHINGLES = 4096  # shingles permuted at once (x num_perm: 2 MB at 128, in the CPU cache)
_CANDIDATE_RECALL = 0.99  # chance that the bands make a pair at exactly the threshold a candidate
_EXACT, _MINHASH = 1, 2  # `method` codes while resolving (0: kept)
# The base of the polynomial hashes (its low 32 bits for shingle bytes, all 64 for band values)
# and the multipliers of MurmurHash3's 64-bit finaliser: odd constants, fixed, so that signatures
# are the same on every machine and with every library version.
_BASE = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53


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
    version = "2"  # signatures and bands of our own (numpy) since version 2, datasketch's before
    side_tables = ("removed",)

    def input_tables(self):
        return [(("input",), self.config.input)]

    def run(self, ctx) -> None:
        import numpy as np
        import polars as pl

        from datamill import progress
        from datamill.records import text_column

        cfg, near = self.config, self.config.minhash
        n = ctx.input_rows(cfg.input)
        head = pl.read_parquet(ctx.input_path(cfg.input), n_rows=0)  # the columns, no rows
        column = text_column(head, cfg.column, f"dedup input '{cfg.input}'")
        bands = lsh_bands(near.threshold, near.num_perm) if near else None
        ctx.state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="dedup-", dir=ctx.state_dir) as folder:
            spill = Spill(Path(folder), bands[0], near.num_perm) if near else None
            digests, ids = self._hash(ctx, column, n, bands, spill, has_id="id" in head.columns)

            # Per row: the kept row it duplicates (-1: kept), how that was found, how similar.
            target = np.full(n, -1, np.int64)
            method = np.zeros(n, np.int8)
            similarity = np.zeros(n, np.float64)
            if cfg.exact:
                find_exact(digests, target, method, similarity)
                del digests
            candidates = 0
            if near is not None:
                rows = np.flatnonzero(target < 0)  # exact copies are not compared (nor kept)
                buckets = []  # as many bands in memory at once as there are workers
                with progress.bar(f"{ctx.name}: band buckets", total=bands[0], unit="bands") as bar:
                    for first in range(0, bands[0], ctx.shards.workers):
                        wave = range(first, min(first + ctx.shards.workers, bands[0]))
                        buckets += ctx.shards.map(band_buckets, [(rows, spill.band_keys(band)) for band in wave])
                        bar.advance(len(wave))
                candidates = find_near(spill.signatures, buckets, near.threshold, target, method, similarity,
                                       f"{ctx.name}: minhash dedup")
                del buckets
                # An exact copy of a row that minhash removed duplicates what that row duplicated.
                copies = np.flatnonzero(method == _EXACT)
                moved = copies[method[target[copies]] == _MINHASH]
                target[moved], similarity[moved] = target[target[moved]], similarity[target[moved]]
                method[moved] = _MINHASH

        self._write(ctx, head, n, target, method, similarity, ids)
        ctx.stats.update({"rows_in": n, "kept": int((target < 0).sum()),
                          "removed_exact": int((method == _EXACT).sum()),
                          "removed_minhash": int((method == _MINHASH).sum())})
        if near is not None:
            ctx.stats["minhash"] = {"bands": bands[0], "rows_per_band": bands[1], "candidate_rows": candidates}
        ctx.stats.update(ctx.shards.summary())

    def _hash(self, ctx, column: str, n: int, bands: tuple[int, int] | None, spill: "Spill | None",
              has_id: bool):
        """Pass 1: the input's text column in streamed batches, one row shard each (as many at
        once as the executor has workers, so memory holds that many batches of text) ->
        exact digests (n, 16) and row ids; the signatures and band keys go to `spill`."""
        import numpy as np
        import polars as pl

        from datamill import progress

        cfg, near = self.config, self.config.minhash
        digests = np.empty((n, 16), np.uint8) if cfg.exact else None
        ids = []
        shard = functools.partial(hash_rows, exact=cfg.exact, minhash=near, bands=bands)
        columns = list(dict.fromkeys([column, "id"] if has_id else [column]))
        batches = ctx.read_batches(cfg.input, columns=columns)
        start = 0
        with progress.bar(f"{ctx.name}: hash rows", total=n) as bar:
            while wave := list(itertools.islice(batches, ctx.shards.workers)):
                results = ctx.shards.map(shard, [batch[column] for batch in wave],
                                         on_emit=lambda _, rows: bar.advance(rows))
                for batch, (digest, sig, key) in zip(wave, results):
                    stop = start + batch.height
                    if digests is not None:
                        digests[start:stop] = digest
                    if spill is not None:
                        spill.append(sig, key)
                    if has_id:
                        ids.append(batch["id"].cast(pl.String))
                    start = stop
        if spill is not None:
            spill.close()
        return digests, (pl.concat(ids).rechunk() if ids else None)

    def _write(self, ctx, head, n: int, target, method, similarity, ids) -> None:
        """Pass 2: the input again, batch by batch, split into kept and removed rows."""
        import numpy as np
        import polars as pl

        from datamill import progress

        start = 0
        batches = ctx.read_batches(self.config.input) if n else iter([head])  # an empty table: its columns
        with ctx.writer() as kept, ctx.writer("removed") as removed, \
                progress.bar(f"{ctx.name}: write", total=n) as bar:
            for batch in batches:
                rows = slice(start, start + batch.height)
                gone = target[rows] >= 0
                to = target[rows][gone]
                kept.write(batch.filter(pl.Series(~gone)))
                removed.write(batch.filter(pl.Series(gone)).with_columns(
                    ids.gather(to).alias("duplicate_of") if ids is not None
                    else pl.Series("duplicate_of", to, dtype=pl.Int64).cast(pl.String),
                    pl.Series("method", np.where(method[rows][gone] == _EXACT, "exact", "minhash"), dtype=pl.String),
                    pl.Series("similarity", similarity[rows][gone], dtype=pl.Float64)))
                bar.advance(batch.height)
                start = rows.stop


def normalize_text(text: str) -> str:
    """What 'the same text' means: NFKC, lowercase, runs of whitespace -> one space."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def shingles(text: str, ngram: int) -> list[bytes]:
    """Word n-grams of a normalised text; a text shorter than n words is one shingle.
    (The definition: `shingle_hashes` hashes exactly these byte strings, without making them.)"""
    words = text.split(" ")
    if len(words) < ngram:
        return [text.encode("utf-8")]
    return [" ".join(words[i:i + ngram]).encode("utf-8") for i in range(len(words) - ngram + 1)]


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band): the longest bands (fewest chance candidates to confirm) with which
    a pair at exactly the threshold still shares a band with probability >= 0.99. Every candidate
    is confirmed by its estimate, so the bands only decide what may be missed (datasketch's
    balance of false positives and negatives gave 8 x 16 at 0.85: a pair at 0.85 was a candidate
    46 % of the time). Bands use the first bands x rows permutations; estimates use all."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= _CANDIDATE_RECALL:
            return bands, rows
    return num_perm, 1


# --------------------------------------------------------------------------- row shards

def hash_rows(column, *, exact: bool, minhash: MinhashConfig | None, bands: tuple[int, int] | None,
              emit=None):
    """A row shard: a batch's text column -> (exact digests (rows, 16) uint8, signatures
    (rows, num_perm) uint32, band keys (bands, rows) uint64), None for what is not asked. The
    texts are made _CHUNK_ROWS at a time, so a batch's texts are never all in memory."""
    import numpy as np

    n = len(column)
    digests = np.empty((n, 16), np.uint8) if exact else None
    sigs = np.empty((n, minhash.num_perm), np.uint32) if minhash is not None else None
    for start in range(0, n, _CHUNK_ROWS):
        rows = slice(start, min(start + _CHUNK_ROWS, n))
        texts = [normalize_text(t) for t in column_texts(column[rows])]
        if exact:
            # 16 bytes of blake2b per text: equal digests are equal texts, at any table size
            joined = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts)
            digests[rows] = np.frombuffer(joined, np.uint8).reshape(len(texts), 16)
        if minhash is not None:
            sigs[rows] = signatures(texts, minhash.ngram, minhash.num_perm, minhash.seed)
        if emit is not None:
            emit(len(texts))
    return digests, sigs, (band_keys(sigs, *bands) if minhash is not None else None)


def column_texts(column) -> list[str]:
    """One text per row of a column, as `datamill.records.column_texts` makes them (message
    contents joined by newlines), in Polars for messages and strings."""
    import polars as pl

    from datamill.records import column_texts as python_texts

    dtype = column.dtype
    if isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct) \
            and "content" in [f.name for f in dtype.inner.fields]:
        column = column.list.eval(pl.element().struct.field("content")).list.join("\n")
    elif dtype != pl.String:
        return python_texts(column.to_frame(), column.name)
    return column.fill_null("").to_list()


def signatures(texts: list[str], ngram: int, num_perm: int, seed: int):
    """MinHash signatures of normalised texts: (rows, num_perm) uint32, computed on pieces of
    about a megabyte of text."""
    import numpy as np
    import pyarrow as pa

    a, b = permutations(num_perm, seed)
    out = np.empty((len(texts), num_perm), np.uint32)
    # the texts' UTF-8 bytes back to back, and where each starts
    array = pa.array(texts, type=pa.large_string())
    offsets = np.frombuffer(array.buffers()[1], np.int64)[:len(texts) + 1]
    data = np.frombuffer(array.buffers()[2], np.uint8) if array.buffers()[2] else np.empty(0, np.uint8)
    start = 0
    while start < len(texts):
        stop = int(np.searchsorted(offsets, offsets[start] + _PIECE_BYTES, "right")) - 1
        stop = min(max(stop, start + 1), len(texts))
        hashes, counts = shingle_hashes(data[offsets[start]:offsets[stop]], offsets[start:stop + 1] - offsets[start],
                                        ngram)
        out[start:stop] = min_hashes(hashes, counts, a, b).T
        start = stop
    return out


def permutations(num_perm: int, seed: int):
    """The seeded permutations of 32-bit hashes, x -> a x + b (mod 2^32) with a odd: (a, b)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2 ** 32, num_perm, dtype=np.uint32) | np.uint32(1)
    return a, rng.integers(0, 2 ** 32, num_perm, dtype=np.uint32)


def shingle_hashes(data, offsets, ngram: int):
    """32-bit hashes of the shingles of normalised texts (their UTF-8 bytes `data`, text i at
    offsets[i]:offsets[i + 1]) -> (hashes, shingles per text), text by text.

    A shingle's hash is a polynomial hash of its bytes ("w1 w2 w3"), sum (byte_k + 1) B^k mod 2^32,
    mixed by MurmurHash3's fmix32 (32 bits as datasketch's sha1_hash32: signature values are 32-bit).
    With prefix sums of (byte + 1) B^j over the piece, a substring's hash is a difference of two of
    them times B^-start, so shingles are hashed without being made."""
    import numpy as np

    size = len(data)
    power, inverse = _powers(size)
    weighted = np.add(data, 1, dtype=np.uint32)  # + 1: a zero byte still counts
    weighted *= power[:size]
    prefix = np.zeros(size + 1, np.uint32)
    np.cumsum(weighted, out=prefix[1:])
    del weighted
    # Words are separated by single spaces (normalised); an empty text is one empty word.
    spaces = np.flatnonzero(data == 32)
    words = np.diff(np.searchsorted(spaces, offsets)) + 1
    first_word = np.cumsum(words) - words
    last_word = first_word + words - 1
    inner = np.ones(words.sum(), bool)  # words that start after a space
    inner[first_word] = False
    word_starts = np.empty(len(inner), np.int64)
    word_starts[first_word], word_starts[inner] = offsets[:-1], spaces + 1
    inner[:] = True  # words that end at a space
    inner[last_word] = False
    word_ends = np.empty(len(inner), np.int64)
    word_ends[last_word], word_ends[inner] = offsets[1:], spaces
    span = np.minimum(words, ngram)  # words per shingle: all of a text shorter than ngram
    counts = words - span + 1
    first_shingle = np.cumsum(counts) - counts
    starts = np.arange(counts.sum()) + np.repeat(first_word - first_shingle, counts)  # each shingle's first word
    begin, end = word_starts[starts], word_ends[starts + np.repeat(span - 1, counts)]
    return _mix32((prefix[end] - prefix[begin]) * inverse[begin]), counts


def min_hashes(hashes, counts, a, b):
    """Per text and permutation, the least permuted hash of its shingles: (num_perm, texts). The
    texts go a block of about _BLOCK_SHINGLES shingles at a time, all permutations at once: the
    block's num_perm x 4,096 values stay in the CPU cache, and numpy makes three calls a block."""
    import numpy as np

    starts = np.cumsum(counts) - counts  # every text has a shingle: starts increase
    out = np.empty((len(a), len(counts)), np.uint32)
    first = 0
    while first < len(counts):
        last = max(first + 1, int(np.searchsorted(starts, starts[first] + _BLOCK_SHINGLES, "right")))
        begin, end = starts[first], (starts[last] if last < len(counts) else len(hashes))
        permuted = np.multiply.outer(a, hashes[begin:end])  # wraps mod 2^32
        permuted += b[:, None]
        out[:, first:last] = np.minimum.reduceat(permuted, starts[first:last] - begin, axis=1)
        first = last
    return out


def band_keys(sigs, bands: int, rows: int):
    """One 64-bit key per band and row: a polynomial hash of the band's signature values, mixed
    -> (bands, rows) uint64. Rows with equal keys share the band (two different bands colliding
    in 64 bits only adds a candidate, which its estimate then judges)."""
    import numpy as np

    keys = np.empty((bands, len(sigs)), np.uint64)
    for band in range(bands):
        key = np.zeros(len(sigs), np.uint64)
        for column in range(band * rows, (band + 1) * rows):
            key *= np.uint64(_BASE)
            key += sigs[:, column]
        keys[band] = _mix(key)
    return keys


def _mix(h):
    """MurmurHash3's 64-bit finaliser, in place: every input bit reaches every output bit."""
    import numpy as np

    shift = np.uint64(33)
    h ^= h >> shift
    h *= np.uint64(_MIX1)
    h ^= h >> shift
    h *= np.uint64(_MIX2)
    h ^= h >> shift
    return h


def _mix32(h):
    """MurmurHash3's 32-bit finaliser, in place."""
    import numpy as np

    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


@functools.lru_cache(maxsize=1)
def _base_powers(size: int):
    import numpy as np

    base = _BASE & 0xFFFFFFFF  # odd: invertible mod 2^32
    power = np.full(size + 1, base, np.uint32)
    power[0] = 1
    np.cumprod(power, out=power)  # wraps mod 2^32
    inverse = np.full(size + 1, pow(base, -1, 2 ** 32), np.uint32)
    inverse[0] = 1
    np.cumprod(inverse, out=inverse)
    return power, inverse


def _powers(size: int):
    """B^j and B^-j mod 2^32 for j = 0..size, from one cached table of a piece's size or more."""
    return _base_powers(max(size, _PIECE_BYTES))


class Spill:
    """Pass 1's per-row arrays on disk, not in memory (at 10M rows and 128 permutations the
    signatures alone take 5 GB): the signatures (rows, num_perm) and each band's keys, appended
    batch by batch; read back one band at a time, and only the signatures of the rows that have
    candidates (those in a shared bucket: a few in ten on deduplicated data)."""

    _READ_ROWS = 65_536  # signatures read at once when gathering (32 MB at 128 permutations)

    def __init__(self, folder: Path, bands: int, num_perm: int):
        self.num_perm, self.rows = num_perm, 0
        self.signature_path = folder / "signatures.u32"
        self.band_paths = [folder / f"band{band}.u64" for band in range(bands)]
        self._files = [open(path, "wb") for path in [self.signature_path, *self.band_paths]]

    def append(self, sigs, keys) -> None:
        sigs.tofile(self._files[0])
        for band, file in enumerate(self._files[1:]):
            keys[band].tofile(file)
        self.rows += len(sigs)

    def close(self) -> None:
        for file in self._files:
            file.close()

    def band_keys(self, band: int):
        """Every row's key in one band: (rows,) uint64."""
        import numpy as np

        return np.fromfile(self.band_paths[band], np.uint64)

    def signatures(self, rows):
        """The signatures of `rows` (ascending): (len(rows), num_perm) uint32, read in blocks,
        skipping those that hold none of them."""
        import numpy as np

        out = np.empty((len(rows), self.num_perm), np.uint32)
        with open(self.signature_path, "rb") as file:
            for start in range(0, self.rows, self._READ_ROWS):
                stop = min(start + self._READ_ROWS, self.rows)
                a, b = np.searchsorted(rows, [start, stop])
                if a == b:
                    continue
                file.seek(start * self.num_perm * 4)
                block = np.fromfile(file, np.uint32, count=(stop - start) * self.num_perm).reshape(-1, self.num_perm)
                out[a:b] = block[rows[a:b] - start]
        return out


# --------------------------------------------------------------------------- band shards

def band_buckets(shard):
    """A band shard: (row numbers ascending, every row's key in one band) -> (those rows that share
    their key with another of them, ascending; the first row of that bucket, which names it)."""
    import numpy as np

    rows, keys = shard
    keys = keys[rows]
    ordered = np.sort(keys)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])  # keys of two rows or more
    at = np.searchsorted(repeated, keys).clip(max=max(len(repeated) - 1, 0))
    shared = repeated[at] == keys if len(repeated) else np.zeros(len(keys), bool)
    rows, bucket = rows[shared], at[shared]
    _, first = np.unique(bucket, return_index=True)  # where each bucket first appears: its first row
    first_row = np.empty(len(repeated), rows.dtype)
    first_row[bucket[first]] = rows[first]
    return rows, first_row[bucket]


# --------------------------------------------------------------------------- resolution (here)

def find_exact(digests, target, method, similarity) -> None:
    """Mark every row whose normalised text appeared earlier as an exact duplicate of the first."""
    import numpy as np

    _, first, inverse = np.unique(digests.view("V16").ravel(), return_index=True, return_inverse=True)
    firsts = first[inverse]  # np.unique's index is each digest's first occurrence
    copies = np.flatnonzero(firsts != np.arange(len(firsts)))
    target[copies], method[copies], similarity[copies] = firsts[copies], _EXACT, 1.0


def find_near(signatures_of, buckets, threshold: float, target, method, similarity, desc: str) -> int:
    """Keep-first in input order: a row's candidates are the rows kept so far in its buckets (of
    every band); the best whose estimated Jaccard reaches the threshold (highest, then earliest)
    is what it duplicates, else it is kept and joins its buckets. Rows in no shared bucket have
    no candidate and no one compares with them: kept. `signatures_of(rows ascending)` gives the
    signatures of the rows in a bucket, only those. -> the rows that had a bucket to look in."""
    import numpy as np

    from datamill.progress import bar

    n = len(target)
    rows = np.concatenate([r for r, _ in buckets])
    if not len(rows):
        return 0
    ids = np.concatenate([band * n + first for band, (_, first) in enumerate(buckets)])  # bucket: (band, first row)
    order = np.argsort(rows, kind="stable")
    rows, ids = rows[order], ids[order].tolist()
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    bounds = np.r_[starts, len(rows)].tolist()
    bucketed = rows[starts]  # ascending; from here on a row is its place k in this list
    sigs = signatures_of(bucketed)
    num_perm = sigs.shape[1]
    # the equal values an estimate needs, counted: count / num_perm >= threshold as a float compares
    needed = next(c for c in range(num_perm + 1) if c / num_perm >= threshold)
    kept_in: dict[int, list[int]] = {}
    with bar(desc, total=len(starts)) as progress:
        for k, i in enumerate(bucketed.tolist()):
            if k % 1000 == 999:
                progress.advance(1000)
            own = ids[bounds[k]:bounds[k + 1]]
            candidates = set()
            for bucket in own:
                kept = kept_in.get(bucket)
                if kept:
                    candidates.update(kept)
            if candidates:
                candidates = sorted(candidates)
                equal = (sigs[candidates] == sigs[k]).sum(axis=1)
                best = int(equal.argmax())  # the first of the highest: the earliest
                if equal[best] >= needed:
                    target[i], method[i] = bucketed[candidates[best]], _MINHASH
                    similarity[i] = int(equal[best]) / num_perm
                    continue
            for bucket in own:
                kept_in.setdefault(bucket, []).append(k)
        progress.advance(len(starts) % 1000)
    return len(starts)
