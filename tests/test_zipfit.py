"""ZIP-FIT scoring: the C kernel against zlib and the paper's per-pair gzip method, the fast mode,
and the fallbacks when the kernel is missing or wrong."""

from __future__ import annotations

import gzip
import importlib.util
import random
import string
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest

from selection import zipfit

ROOT = Path(__file__).resolve().parent.parent


def tricky_texts(seed: int) -> list[str]:
    """Texts unlike the kernel's probes: incompressible, repetitive, non-ASCII, empty, > 16 KB."""
    rng = random.Random(seed)
    noise = "".join(rng.choice(string.printable) for _ in range(3000))
    return [
        noise,
        "abc" * 2000,
        "a",
        "",
        "Ünïcödé — 東京の天気は晴れ。Привет, мир! 🚀" * 20,
        " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(5000)),  # > 16 KB
        "def f(x):\n    return x * 2\n" * 50,
        "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(400)),
    ]


def crafted_bytes(seed: int) -> list[bytes]:
    """Inputs for each decision the kernel copies from zlib: several blocks (> 16,383 symbols),
    stored blocks, Huffman lengths over the 15-bit limit, far and 258-byte matches, zero bytes
    (matches run into the padding past the end), and sizes on both sides of the covered limit."""
    rng = random.Random(seed)
    fib = [1, 1]
    while len(fib) < 24:
        fib.append(fib[-1] + fib[-2])
    skewed = bytearray(b for b, f in zip(rng.sample(range(256), len(fib)), fib) for _ in range(f))
    rng.shuffle(skewed)
    copies = bytearray(rng.randbytes(500))
    while len(copies) < 50_000:
        if rng.random() < 0.5:
            back, length = rng.randrange(1, len(copies)), rng.randrange(3, 300)
            copies += bytes(copies[-back] for _ in range(length))
        else:
            copies.append(rng.randrange(256))
    return [
        b"", b"\x00", b"\x00" * 5, b"xy", rng.randbytes(40_000), bytes(skewed[:64_000]), bytes(copies),
        b"\x00ab" * 3000, b"z" * 65_000, b"z" * 65_001, rng.randbytes(5000) * 3,
        " ".join(str(rng.randrange(10**6)) for _ in range(9000)).encode(),
    ]


@pytest.mark.parametrize("level", range(1, 10))
def test_kernel_sizes_equal_zlib(level):
    from selection import _deflate_size as kernel  # fails when the build broke: CI must notice

    texts = crafted_bytes(level) + [t.encode() for t in tricky_texts(level)]
    expected = [len(zlib.compress(t, level, -15)) for t in texts]
    got = kernel.sizes(texts, level)
    assert [g for g, t in zip(got, texts) if len(t) > kernel.COVERED_INPUT] == [-1]  # zlib's job
    assert [g for g, t in zip(got, texts) if len(t) <= kernel.COVERED_INPUT] == \
        [e for e, t in zip(expected, texts) if len(t) <= kernel.COVERED_INPUT]
    xs, ys = texts[:6], texts[6:9]
    pairs = np.empty((len(xs), len(ys)), dtype=np.int32)
    kernel.pair_sizes(xs, ys, level, pairs)
    want = [[len(zlib.compress(x + y, level, -15)) if len(x + y) <= kernel.COVERED_INPUT else -1 for y in ys]
            for x in xs]
    np.testing.assert_array_equal(pairs, want)


def test_the_kernel_is_trusted_here():
    """The probes agree with this machine's zlib at every level, so exact mode runs on the kernel."""
    for level in range(1, 10):
        assert zipfit._kernel(level, "exact") is not None, f"kernel rejected at level {level}"


@pytest.mark.parametrize("level", [9, 1])
def test_exact_scores_equal_the_naive_per_pair_gzip_method(level, monkeypatch):
    candidates = tricky_texts(1) + [f"question {i}: what is {i} + {i}?" for i in range(10)] + ["ab" * 40_000]
    targets = tricky_texts(2)[:5] + ["what is 3 + 4?", "what is 10 + 2?"]
    assert len(candidates[5].encode()) > 16_384
    expected = zipfit.naive_zipfit_scores(candidates, targets, level=level)
    np.testing.assert_array_equal(zipfit.zipfit_scores(candidates, targets, level=level, workers=1), expected)
    monkeypatch.setattr(zipfit, "_PARALLEL_PAIRS", 1)  # force several threads on small chunks
    monkeypatch.setattr(zipfit, "_CHUNK", 3)
    np.testing.assert_array_equal(zipfit.zipfit_scores(candidates, targets, level=level, workers=2), expected)


def test_compressed_size_is_gzip_length():
    for text in tricky_texts(3):
        for level in (1, 6, 9):
            data = text.encode()
            assert zipfit.compressed_size(data, level) == len(gzip.compress(data, compresslevel=level))


def task_texts():
    from datagen.tasks import generate_tasks
    from datamill.records import text_of

    candidates = [text_of(r["messages"]) for r in generate_tasks(None, 700, 0)]
    targets = [text_of(r["messages"]) for r in generate_tasks(["capitals"], 50, 1)]
    return candidates, targets


def test_fast_mode_ranks_like_exact():
    from scipy.stats import spearmanr

    candidates, targets = task_texts()
    exact = zipfit.zipfit_scores(candidates, targets)
    fast = zipfit.zipfit_scores(candidates, targets, mode="fast")
    assert not np.array_equal(exact, fast)  # it is a different computation...
    assert spearmanr(exact, fast)[0] >= 0.995  # ...that ranks the same way
    assert len(set(np.argsort(-exact)[:70]) & set(np.argsort(-fast)[:70])) >= 63


def test_without_the_kernel_scores_are_the_same_with_a_warning(monkeypatch):
    import selection

    candidates, targets = tricky_texts(4), ["what is 3 + 4?", "Привет, мир!"]
    expected = zipfit.naive_zipfit_scores(candidates, targets)
    monkeypatch.delattr(selection, "_deflate_size", raising=False)
    monkeypatch.setitem(sys.modules, "selection._deflate_size", None)  # import now fails
    zipfit._kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="not built"):
            scores = zipfit.zipfit_scores(candidates, targets)
        np.testing.assert_array_equal(scores, expected)
    finally:
        monkeypatch.undo()
        zipfit._kernel.cache_clear()


def test_a_kernel_that_disagrees_with_zlib_is_not_used(monkeypatch):
    import selection

    def off_by_one(texts, level, fast=False):
        return [len(zlib.compress(t, level, -15)) + (level == 9) for t in texts]

    wrong = types.SimpleNamespace(sizes=off_by_one, COVERED_INPUT=65_000)
    monkeypatch.setattr(selection, "_deflate_size", wrong, raising=False)
    zipfit._kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="disagrees with this zlib"):
            assert zipfit._kernel(9, "exact") is None
        assert zipfit._kernel(1, "exact") is wrong  # checked level by level
        candidates, targets = tricky_texts(5)[:4], ["what is 3 + 4?"]
        np.testing.assert_array_equal(zipfit.zipfit_scores(candidates, targets),
                                      zipfit.naive_zipfit_scores(candidates, targets))
    finally:
        monkeypatch.undo()
        zipfit._kernel.cache_clear()


def test_zipfit_prefers_texts_like_the_targets_and_checks_its_arguments():
    targets = [f"What is {a} + {b}? {a} + {b} = {a + b}." for a, b in [(3, 4), (12, 9), (7, 7)]]
    candidates = ["What is 5 + 6? 5 + 6 = 11.", "The capital of France is Paris, a city on the Seine."]
    for mode in zipfit.MODES:
        scores = zipfit.zipfit_scores(candidates, targets, mode=mode)
        assert scores[0] > scores[1]
    with pytest.raises(ValueError, match="at least one target"):
        zipfit.zipfit_scores(candidates, [])
    with pytest.raises(ValueError, match="mode must be one of exact, fast"):
        zipfit.zipfit_scores(candidates, targets, mode="quick")
    with pytest.raises(ValueError, match="level must be 0..9"):
        zipfit.zipfit_scores(candidates, targets, level=10)


# ---- realistic lengths: the scale corpus (bench/corpus.py), median ~530 characters, tail to 8k ----


def scale_corpus():
    spec = importlib.util.spec_from_file_location("bench_corpus", ROOT / "bench" / "corpus.py")
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    return corpus


@pytest.fixture(scope="module")
def realistic():
    """Candidates and targets of instruction length, and the inputs past each of the kernel's
    limits: several-KB texts (the corpus's longest), non-ASCII, a target longer than the window
    distance (32,506 bytes: no target summary), a pair longer than it, a candidate of more than
    one block (> 16,383 symbols), pairs over the covered 65,000 bytes (zlib for the pair) and a
    candidate over it (zlib for its every pair)."""
    corpus = scale_corpus()
    rows = [row for chunk in corpus.corpus_rows(800, seed=7) for row in chunk]
    texts = corpus.texts(rows)
    by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    rng = random.Random(7)
    typical = [texts[i] for i in rng.sample(by_length[:700], 14)]
    longest = [texts[i] for i in by_length[-4:]]
    unicode = [t.replace("the", "thé").replace(" a ", " — 東京 ") + " Привет 🚀" for t in typical[:3]]
    far = " ".join(texts[i] for i in by_length[-40:])[:40_000]
    blocks = "".join(chr(rng.randrange(0x20, 0x2FF)) for _ in range(12_000))  # ~22 KB, > 16,383 symbols
    over = (texts[0] * 200)[:66_000]
    candidates = typical + longest + unicode + [far, blocks, over, "", "a"]
    targets = corpus.target_texts(6, seed=2) + [longest[0], unicode[0], far[:33_000], "", "é"]
    assert max(len(c) for c in longest) > 3_000 and len(far[:33_000].encode()) > 32_506
    assert len(over) > 65_000 and len(far) + 33_000 > 65_000
    return candidates, targets


@pytest.mark.parametrize("level", [9, 6, 1])
def test_exact_scores_equal_the_paper_method_at_realistic_lengths(level, realistic, monkeypatch):
    candidates, targets = realistic
    expected = zipfit.naive_zipfit_scores(candidates, targets, level=level)
    np.testing.assert_array_equal(zipfit.zipfit_scores(candidates, targets, level=level, workers=1), expected)
    monkeypatch.setattr(zipfit, "_PARALLEL_PAIRS", 1)
    monkeypatch.setattr(zipfit, "_CHUNK", 4)
    np.testing.assert_array_equal(zipfit.zipfit_scores(candidates, targets, level=level, workers=2), expected)


@pytest.mark.parametrize("level", range(1, 10))
def test_pair_sizes_equal_zlib_at_realistic_lengths(level, realistic):
    """The kernel on its own: every pair's size is zlib's (-1 where zlib is left to do it), with the
    targets prepared once and reused, as zipfit_scores does, and given as a plain list."""
    from selection import _deflate_size as kernel

    candidates, targets = realistic
    xs, ys = [c.encode() for c in candidates], [t.encode() for t in targets]
    want = [[len(zlib.compress(x + y, level, -15)) if len(x) + len(y) <= kernel.COVERED_INPUT else -1 for y in ys]
            for x in xs]
    prepared = kernel.prepare_targets(ys, level)
    for given in (prepared, prepared, ys):
        got = np.empty((len(xs), len(ys)), dtype=np.int32)
        kernel.pair_sizes(xs, given, level, got)
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="prepared for level"):
        kernel.pair_sizes(xs, prepared, level % 9 + 1, np.empty((len(xs), len(ys)), dtype=np.int32))


def test_pair_sizes_where_x_and_y_meet():
    """The candidate is parsed once up to where what follows it matters: matches that run from x
    into y, y repeating x's end, x's last bytes hashed with y's first, tiny and empty sides, and a
    block that ends in y."""
    from selection import _deflate_size as kernel

    rng = random.Random(11)
    words = [bytes(rng.choice(b"abcde ") for _ in range(rng.randrange(1, 7))) for _ in range(40)]
    base = b"".join(rng.choice(words) for _ in range(400))
    xs, ys = [], []
    for cut in (0, 1, 2, 3, 50, 257, 258, 259, 700, len(base) - 2, len(base)):
        xs.append(base[:cut])
        ys.append(base[cut:cut + 600])
    xs += [b"ab" * 300, b"ab" * 300 + b"a", b"\0" * 10, b"z" * 1000, rng.randbytes(16_200)]  # last: a block ends in y
    ys += [b"ab" * 300, b"b" + b"ab" * 300, b"\0" * 400, b"z" * 2, b"", b"abc"]
    for level in range(1, 10):
        got = np.empty((len(xs), len(ys)), dtype=np.int32)
        kernel.pair_sizes(xs, kernel.prepare_targets(ys, level), level, got)
        np.testing.assert_array_equal(got, [[len(zlib.compress(x + y, level, -15)) for y in ys] for x in xs])


def test_many_inputs_wrap_the_hash_table_stamps():
    """Hash table entries carry a 16-bit input stamp instead of being cleared: after 65,535 inputs
    the table is cleared once and the stamps start over."""
    from selection import _deflate_size as kernel

    texts = [f"{i} {i * 7} {i % 13} abc abc".encode() for i in range(70_000)]
    sample = list(range(0, 70_000, 997)) + list(range(65_530, 65_545))
    sizes = kernel.sizes(texts, 6)
    assert [sizes[i] for i in sample] == [len(zlib.compress(texts[i], 6, -15)) for i in sample]


def test_fast_mode_ranks_like_exact_at_realistic_lengths():
    from scipy.stats import spearmanr

    corpus = scale_corpus()
    candidates = corpus.texts([row for chunk in corpus.corpus_rows(300, seed=5) for row in chunk])
    targets = corpus.target_texts(40, seed=1)
    exact = zipfit.zipfit_scores(candidates, targets)
    fast = zipfit.zipfit_scores(candidates, targets, mode="fast")
    assert not np.array_equal(exact, fast)
    assert spearmanr(exact, fast)[0] >= 0.995
    assert len(set(np.argsort(-exact)[:30]) & set(np.argsort(-fast)[:30])) >= 26
