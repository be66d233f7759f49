"""ZIP-FIT (Obbad et al. 2024; reference: stair-lab/ZIP-FIT `zip_fit/zipfit.py`): align candidates
with a target task by gzip compression.

    C(s)      = len(gzip.compress(s.encode("utf-8"), level))
    NCD(x, y) = (C(x + y) - min(C(x), C(y))) / max(C(x), C(y))      (x + y: plain concatenation)
    score(x)  = mean over targets y of 1 - NCD(x, y)                 (higher = more aligned)

Two modes:
- `exact` (default): the same numbers, bit for bit, as that per-pair formula
  (`naive_zipfit_scores`, kept as the reference for tests and benchmarks). gzip's output is a
  10-byte header, the raw DEFLATE stream and an 8-byte trailer, so C(s) is the raw stream's size
  plus 18. The sizes come from `selection/_deflate_size.c`, a C kernel that makes zlib's
  decisions (match search, blocks, Huffman trees) and counts the bits without writing them. It
  shares work between pairs: each candidate x is parsed once, up to the point where what follows
  it starts to matter, and every target continues from there; each target's own hash chains are
  summarized once (`prepare_targets`), so a pair only searches the candidate's part. It is
  checked against this process's zlib on probe texts and probe pairs before first use, per
  level, and zlib itself is used for any level where it disagrees, for inputs over 65,000 bytes,
  and when the kernel is not built (with a warning: same scores, several times slower).
- `fast`: the same parse with optimal Huffman code lengths instead of zlib's own (whose
  tie-breaking must be simulated with its heap): C(s) within a byte or two of gzip's, somewhat
  quicker than `exact`, and not equal to the paper's numbers (bench/zipfit.md reports its speed
  and rank correlation).

Pairs run on threads (the kernel releases the GIL), in chunks of candidates against all targets
(one C call per chunk). Notes on the reference: it now defaults to lz4 at level 0 (and gzip
level 0 stores the data uncompressed, reducing NCD to length arithmetic); datamill follows the
paper with gzip and `level` (default 9, Python's gzip default; level 1 is the first release's).
"""

from __future__ import annotations

import gzip
import math
import os
import random
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from functools import cache

import numpy as np

GZIP_OVERHEAD = 18  # header (10) + CRC32 and size (8) around the raw DEFLATE stream
MODES = ("exact", "fast")
_PARALLEL_PAIRS = 200_000  # below this many pairs, one worker: start-up costs more than it saves
_CHUNK = 64  # candidates per task: even load over the workers, steady progress


def compressed_size(data: bytes, level: int = 9) -> int:
    """len(gzip.compress(data, level)), by zlib, without building the gzip container."""
    return len(zlib.compress(data, level, -15)) + GZIP_OVERHEAD


def zipfit_scores(candidates: list[str], targets: list[str], *, level: int = 9, mode: str = "exact",
                  workers: int | None = None, progress=None) -> np.ndarray:
    """One alignment score per candidate (higher = closer to the targets). `mode="exact"` equals
    the per-pair gzip formula bit for bit; `"fast"` trades that for speed (module docstring).
    `workers`: threads or processes (None = all cores, 1 = this thread). `progress(n)` is called
    with the number of candidates finished, as chunks finish."""
    if not targets:
        raise ValueError("ZIP-FIT needs at least one target text")
    if not 0 <= level <= 9:
        raise ValueError(f"gzip level must be 0..9, found {level}")
    if mode not in MODES:
        raise ValueError(f"ZIP-FIT mode must be one of {', '.join(MODES)}, found {mode!r}")
    xs = [c.encode("utf-8") for c in candidates]
    ys = [t.encode("utf-8") for t in targets]
    workers = workers or os.cpu_count() or 1
    if len(xs) * len(ys) < _PARALLEL_PAIRS:
        workers = 1
    kernel = _kernel(level, mode)
    if kernel is None:
        return _zlib_scores(xs, ys, level, workers, progress)
    fast = mode == "fast"
    target_sizes = _sizes(kernel, ys, level, fast)
    candidate_sizes = _sizes(kernel, xs, level, fast)
    scores = np.empty(len(xs), dtype=np.float64)
    # what every pair with the same target shares, made once (older builds: per call, internally)
    prepared = kernel.prepare_targets(ys, level) if hasattr(kernel, "prepare_targets") else ys

    def chunk(start: int) -> int:
        part = xs[start:start + _CHUNK]
        pairs = np.empty((len(part), len(ys)), dtype=np.int32)
        kernel.pair_sizes(part, prepared, level, pairs, fast)
        for i, j in zip(*np.nonzero(pairs < 0)):  # too long for the kernel: zlib
            pairs[i, j] = len(zlib.compress(part[i] + ys[j], level, -15))
        pairs += GZIP_OVERHEAD
        scores[start:start + len(part)] = _mean_similarity(pairs, candidate_sizes[start:start + len(part)],
                                                           target_sizes)
        return len(part)

    starts = range(0, len(xs), _CHUNK)
    if workers == 1:
        for start in starts:
            done = chunk(start)
            if progress:
                progress(done)
        return scores
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in as_completed([pool.submit(chunk, start) for start in starts]):
            done = future.result()
            if progress:
                progress(done)
    return scores


def naive_zipfit_scores(candidates: list[str], targets: list[str], *, level: int = 9) -> np.ndarray:
    """The paper's method as written: three gzip.compress calls per pair, mean of 1 - NCD.
    Slow; the reference that `zipfit_scores` must equal."""

    def c(s: str) -> int:
        return len(gzip.compress(s.encode("utf-8"), compresslevel=level))

    out = []
    for x in candidates:
        sims = []
        for y in targets:
            cx, cy, cxy = c(x), c(y), c(x + y)
            sims.append(1 - (cxy - min(cx, cy)) / max(cx, cy))
        out.append(math.fsum(sims) / len(sims))
    return np.asarray(out, dtype=np.float64)


def _mean_similarity(pair_sizes: np.ndarray, candidate_sizes: np.ndarray, target_sizes: np.ndarray) -> list[float]:
    """Mean over targets of 1 - NCD, rounded exactly as the per-pair Python formula: sizes are
    exact in float64, so each division and subtraction rounds the same, and fsum sums exactly."""
    cx = candidate_sizes[:, None]
    small, big = np.minimum(cx, target_sizes[None, :]), np.maximum(cx, target_sizes[None, :])
    sims = 1.0 - (pair_sizes - small) / big
    n = pair_sizes.shape[1]
    return [math.fsum(row) / n for row in sims.tolist()]


def _sizes(kernel, texts: list[bytes], level: int, fast: bool) -> np.ndarray:
    sizes = np.asarray(kernel.sizes(texts, level, fast), dtype=np.int64)
    for i in np.nonzero(sizes < 0)[0]:
        sizes[i] = len(zlib.compress(texts[i], level, -15))
    return sizes + GZIP_OVERHEAD


@cache
def _kernel(level: int, mode: str):
    """The C kernel if it is built and reproduces this zlib at `level` (exact mode), else None."""
    try:
        from selection import _deflate_size as kernel
    except ImportError as error:
        warnings.warn(f"ZIP-FIT's C kernel (selection/_deflate_size.c) is not built ({error}); using zlib: "
                      "same scores, about 3x slower. Reinstall with a C compiler (`make install`) to build it.",
                      RuntimeWarning, stacklevel=3)
        return None
    if level == 0:
        return None  # stored blocks: zlib is as fast
    if mode == "exact" and not _agrees_with_zlib(kernel, level):
        warnings.warn(f"ZIP-FIT's C kernel disagrees with this zlib ({zlib.ZLIB_RUNTIME_VERSION}) at level "
                      f"{level}; using zlib itself for exact scores (same scores, several times slower).",
                      RuntimeWarning, stacklevel=3)
        return None
    return kernel


def _agrees_with_zlib(kernel, level: int) -> bool:
    """The kernel's sizes of the probe texts, and of the probe pairs (the shared-work path), equal
    this zlib's (-1 where the kernel leaves an input to zlib)."""
    probes = _probe_texts()
    if kernel.sizes(probes, level) != [len(zlib.compress(p, level, -15)) for p in probes]:
        return False
    if not hasattr(kernel, "pair_sizes"):
        return True
    limit = getattr(kernel, "COVERED_INPUT", 65_000)
    for xs, ys in _probe_pairs():
        got = np.empty((len(xs), len(ys)), dtype=np.int32)
        kernel.pair_sizes(xs, ys, level, got)
        want = [[len(zlib.compress(x + y, level, -15)) if len(x) + len(y) <= limit else -1 for y in ys] for x in xs]
        if not np.array_equal(got, want):
            return False
    return True


@cache
def _probe_texts() -> list[bytes]:
    """Inputs that exercise every decision the kernel copies from zlib: empty and tiny inputs,
    prose, incompressible bytes (stored blocks), long runs (258-byte matches, far distances),
    more symbols than one block holds, skewed counts (length-limited Huffman codes), non-ASCII."""
    rng = random.Random(20261202)
    words = ("the of and to in is that for it as was with be by on not he this are or his from at which but "
             "have an they you were her she there one all we their been has when who will more no if out so "
             "said what up its about into than them can only other new some could time these two may then").split()
    prose = [" ".join(rng.choice(words) for _ in range(n)).encode() for n in (5, 30, 200, 3000)]
    noise = [rng.randbytes(n) for n in (50, 700, 20000)]
    fib = [1, 1]
    while len(fib) < 22:
        fib.append(fib[-1] + fib[-2])
    skewed = bytearray(b for b, f in zip(rng.sample(range(256), len(fib)), fib) for _ in range(f))
    rng.shuffle(skewed)
    return [b"", b"a", b"ab", b"abc", b"a" * 1000, b"ab" * 6000 + b"c" * 40000, *prose, *noise,
            bytes(skewed[:60000]), ("Über naïve café — 東京 " * 200).encode(), prose[2] + noise[1] + prose[2]]


@cache
def _probe_pairs() -> list[tuple[list[bytes], list[bytes]]]:
    """Candidate x target blocks for the kernel's shared work: prose that runs on across the
    boundary (x's last match reaching into y, y continuing x's phrases), y repeating x, empty and
    1-2 byte candidates, long runs (`nice` matches, the shorter chain budget after a good match),
    a target longer than the window distance, a pair longer than it, a candidate of more than one
    block, and a pair over the covered length (left to zlib)."""
    rng = random.Random(20261203)
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
             "tau upsilon phi chi psi omega the of and to in is that").split()

    def prose(n: int) -> bytes:
        return " ".join(rng.choice(words) for _ in range(n)).encode()

    shared, unicode = prose(60), "naïve café — 東京 ".encode() * 20
    xs = [b"", b"a", b"ab", prose(80) + shared[:150], shared * 3, prose(5) + b"abababababab", b"z" * 300,
          prose(120), b"ab\0\0" * 40]
    ys = [shared[150:] + prose(40), shared + prose(30), b"", b"a", b"ab", b"abcabcabc", b"ab" * 700 + prose(20),
          b"z" * 1000, prose(90) + shared[:200] + b"a" * 400, unicode, b"\0ab\0\0" * 30 + b"\0" * 20]
    blocks, far = rng.randbytes(20_000) + prose(50), prose(7_000)  # > 16,383 symbols; > 32,506 bytes
    return [(xs, ys), ([blocks, far, prose(30)], [prose(60) + shared, shared[:200], unicode]),
            ([prose(40), shared, b"w" * 65_001], [far, b"q" * 64_990])]


def _zlib_scores(xs: list[bytes], ys: list[bytes], level: int, workers: int, progress) -> np.ndarray:
    """Exact scores with zlib alone (no kernel): each string compressed once, C(x + y) per pair,
    candidate chunks in worker processes (zlib holds the GIL on short inputs)."""
    target_sizes = [compressed_size(y, level) for y in ys]
    if workers == 1:
        scores = _zlib_chunk(xs, ys, target_sizes, level)
        if progress:
            progress(len(xs))
        return np.asarray(scores, dtype=np.float64)
    scores: list[float] = [0.0] * len(xs)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_zlib_chunk, xs[i:i + _CHUNK * 4], ys, target_sizes, level): i
                   for i in range(0, len(xs), _CHUNK * 4)}
        for future in as_completed(futures):
            start, part = futures[future], future.result()
            scores[start:start + len(part)] = part
            if progress:
                progress(len(part))
    return np.asarray(scores, dtype=np.float64)


def _zlib_chunk(candidates: list[bytes], targets: list[bytes], target_sizes: list[int], level: int) -> list[float]:
    compress = zlib.compress
    n = len(targets)
    out = []
    for x in candidates:
        cx = len(compress(x, level, -15)) + GZIP_OVERHEAD
        sims = []
        for y, cy in zip(targets, target_sizes):
            cxy = len(compress(x + y, level, -15)) + GZIP_OVERHEAD
            small, big = (cx, cy) if cx < cy else (cy, cx)
            sims.append(1.0 - (cxy - small) / big)
        out.append(math.fsum(sims) / n)  # correctly rounded: the same bits whatever the order
    return out
