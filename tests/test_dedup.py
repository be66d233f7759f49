"""The `dedup` step: exact duplicates after normalisation, MinHash near duplicates."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import polars as pl
import pydantic
import pytest
from helpers_steps import run_step

import datamill.step
from datamill.errors import DatamillError
from datamill.records import normalize_record
from datamill.shards import LocalShards
from datamill.step import Env, StepContext
from datamill.steps import dedup
from datamill.steps.dedup import (DedupStep, lsh_bands, normalize_text, permutations, shingle_hashes,
                                  shingles)


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


# --- the MinHash path at scale: band-sharded = sequential, streamed = one batch, Ray = local ---

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def scale_texts() -> list[str]:
    """3,000 rows of the scale corpus (bench/corpus.py: instruction-like texts, 10 % planted near
    copies, some of copies), as dedup sees them (prompt, newline, response), and exact copies in
    other case and spacing of a few originals and of a few planted near copies (whose exact
    copies then point where the near copy does)."""
    spec = importlib.util.spec_from_file_location("bench_corpus", ROOT / "bench" / "corpus.py")
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    rows = [row for chunk in corpus.corpus_rows(3000, seed=3) for row in chunk]
    texts = corpus.texts(rows)
    planted = [i for i, row in enumerate(rows) if row["planted_dup_of"] is not None]
    return texts + [texts[i].upper() for i in (0, 7, 1500)] + ["  " + texts[i] for i in planted[:20:2]]


def sequential_dedup(texts: list[str], threshold: float, exact: bool = True, num_perm: int = 128,
                     ngram: int = 3, seed: int = 1) -> dict[int, tuple[int, str, float]]:
    """The straightforward algorithm, row by row in input order: a dict of the normalised texts
    seen, and a query-before-insert LSH with the step's bands (a dict per band from the band's
    signature values to the rows kept so far) whose candidates count when their estimated Jaccard
    reaches the threshold, the best (highest, then earliest) winning. -> {row: (the row it
    duplicates, method, similarity)}."""
    bands, rows = lsh_bands(threshold, num_perm)
    a, b = (p.astype(np.uint64) for p in permutations(num_perm, seed))
    first_with, index, kept = {}, [{} for _ in range(bands)], {}
    removed = {}
    for i, text in enumerate(texts):
        text = normalize_text(text)
        if exact and first_with.setdefault(text, i) != i:
            removed[i] = (first_with[text], "exact", 1.0)
            continue
        data = np.frombuffer(text.encode("utf-8"), np.uint8)
        hashes, _ = shingle_hashes(data, np.array([0, len(data)]), ngram)
        sig = ((hashes.astype(np.uint64)[:, None] * a + b) % 2 ** 32).min(axis=0)
        keys = [tuple(sig[k * rows:(k + 1) * rows].tolist()) for k in range(bands)]
        best, best_estimate = None, -1.0
        for j in sorted({j for k, key in enumerate(keys) for j in index[k].get(key, ())}):
            estimate = np.count_nonzero(sig == kept[j]) / num_perm
            if estimate >= threshold and estimate > best_estimate:
                best, best_estimate = j, estimate
        if best is not None:
            removed[i] = (best, "minhash", best_estimate)
            continue
        kept[i] = sig
        for k, key in enumerate(keys):
            index[k].setdefault(key, []).append(i)
    for i, (j, method, _) in list(removed.items()):
        if method == "exact" and j in removed:  # an exact copy of a near copy: where that one points
            removed[i] = removed[j]
    return removed


def removed_rows(tables) -> dict[int, tuple[int, str, float]]:
    """The step's `removed` table as sequential_dedup's answer (`duplicate_of` is a row number)."""
    removed = tables["removed"]
    return {row: (int(to), method, similarity) for row, to, method, similarity in
            zip(removed["row"], removed["duplicate_of"], removed["method"], removed["similarity"])}


@pytest.mark.parametrize("threshold, exact", [(0.85, True), (0.6, False)])
def test_band_sharded_minhash_equals_the_sequential_algorithm(tmp_path, monkeypatch, scale_texts, threshold, exact):
    # small batches and three workers: waves of three row shards, then a band shard per band
    monkeypatch.setattr(datamill.step, "BATCH_ROWS", 500)
    monkeypatch.setattr(LocalShards, "workers", 3)
    table = pl.DataFrame({"text": scale_texts, "row": range(len(scale_texts))})
    ctx, tables = run_dedup(tmp_path, table, exact=exact, minhash={"threshold": threshold})

    expected = sequential_dedup(scale_texts, threshold, exact)
    assert removed_rows(tables) == expected
    assert tables["main"]["row"].to_list() == [i for i in range(len(scale_texts)) if i not in expected]
    methods = [method for _, method, _ in expected.values()]
    assert methods.count("minhash") > 150  # the corpus's near copies, not just the exact ones
    assert ctx.stats["removed_exact"] == methods.count("exact")
    assert ctx.stats["removed_minhash"] == methods.count("minhash")
    if exact:  # some exact copies of near copies point where those do
        assert 0 < methods.count("exact") < 13
    assert ctx.stats["shards"] == 7 + lsh_bands(threshold, 128)[0]


def test_streaming_in_tiny_batches_equals_one_batch(tmp_path, monkeypatch, scale_texts):
    table = instruction_table([(t, "ok") for t in scale_texts[:300] + scale_texts[3000:]])
    config = {"minhash": {"threshold": 0.8}}
    _, one = run_dedup(tmp_path / "one", table, **config)
    # 7-row batches, 3-row chunks, 64-byte pieces of text, 5-shingle blocks, signatures read back
    # from the spill file 4 rows at a time: every boundary moves
    monkeypatch.setattr(datamill.step, "BATCH_ROWS", 7)
    monkeypatch.setattr(dedup, "_CHUNK_ROWS", 3)
    monkeypatch.setattr(dedup, "_PIECE_BYTES", 64)
    monkeypatch.setattr(dedup, "_BLOCK_SHINGLES", 5)
    monkeypatch.setattr(dedup.Spill, "_READ_ROWS", 4)
    _, tiny = run_dedup(tmp_path / "tiny", table, **config)
    assert one["removed"].height > 10
    for name in ("main", "removed"):
        assert tiny[name].equals(one[name]), name


def test_the_spill_file_gives_back_the_signatures_and_keys_of_the_rows_asked(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setattr(dedup.Spill, "_READ_ROWS", 4)
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 2**32, (23, 8), dtype=np.uint32)
    keys = rng.integers(0, 2**63, (3, 23), dtype=np.uint64)
    spill = dedup.Spill(tmp_path, bands=3, num_perm=8)
    for a, b in ((0, 10), (10, 11), (11, 23)):  # batches of uneven sizes
        spill.append(sigs[a:b], keys[:, a:b])
    spill.close()
    rows = np.array([1, 2, 9, 12, 13, 22])  # blocks 4-7 and 16-19 hold none of them: skipped
    assert (spill.signatures(rows) == sigs[rows]).all()
    assert all((spill.band_keys(band) == keys[band]).all() for band in range(3))
    assert spill.signatures(np.array([], np.int64)).shape == (0, 8)


def test_shingle_hashes_are_the_polynomial_hash_of_each_shingles_bytes():
    base = dedup._BASE & 0xFFFFFFFF

    def poly(shingle: bytes) -> int:  # sum (byte_k + 1) B^k mod 2^32, then MurmurHash3's fmix32
        h = sum((c + 1) * pow(base, k, 2 ** 32) for k, c in enumerate(shingle)) % 2 ** 32
        return int(dedup._mix32(np.array([h], np.uint32))[0])

    texts = ["a b c d", "a b", "", "x", "héllo wörld ünïcode text here", "ab cd ef gh ij kl"]
    data = np.frombuffer("".join(texts).encode("utf-8"), np.uint8)
    offsets = np.cumsum([0] + [len(t.encode("utf-8")) for t in texts])
    for n in (1, 2, 3, 5):
        hashes, counts = shingle_hashes(data, offsets, n)
        expected = [[poly(s) for s in shingles(t, n)] for t in texts]
        assert counts.tolist() == [len(e) for e in expected]
        assert hashes.tolist() == [h for e in expected for h in e]


def test_lsh_bands_make_a_pair_at_the_threshold_a_candidate():
    assert lsh_bands(0.85, 128) == (16, 8)  # datasketch's 8 x 16 found a 0.85 pair 46 % of the time
    assert lsh_bands(1.0, 128) == (1, 128)  # only identical signatures
    for threshold in (0.3, 0.5, 0.7, 0.9, 0.95):
        bands, rows = lsh_bands(threshold, 128)
        assert bands * rows <= 128 and 1 - (1 - threshold ** rows) ** bands >= 0.99
        assert 1 - (1 - threshold ** (rows + 1)) ** (128 // (rows + 1)) < 0.99  # the longest bands that do


def test_an_empty_table(tmp_path):
    table = pl.DataFrame({"text": [], "n": []}, schema={"text": pl.String, "n": pl.Int64})
    ctx, tables = run_dedup(tmp_path, table, minhash=True)
    assert tables["main"].schema == table.schema and tables["main"].height == 0
    assert tables["removed"].columns == ["text", "n", "duplicate_of", "method", "similarity"]
    assert ctx.stats["rows_in"] == 0 and ctx.stats["kept"] == 0


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_on_ray_the_same_tables_as_locally(tmp_path, monkeypatch, scale_texts, ray_cluster):
    from datamill.shards import RayShards

    monkeypatch.setattr(datamill.step, "BATCH_ROWS", 1000)
    table = pl.DataFrame({"text": scale_texts[:2500]})
    config = {"minhash": {"threshold": 0.8}}
    _, local = run_dedup(tmp_path / "local", table, **config)
    step = DedupStep("clean", DedupStep.Config.model_validate({"input": "pool", **config}))
    path = tmp_path / "pool.parquet"
    table.write_parquet(path)
    out = tmp_path / "ray"
    ctx = StepContext(name="clean", kind="dedup", key="test", out_dir=out, state_dir=tmp_path / "state",
                      shared_dir=tmp_path / "shared", env=Env(base_dir=tmp_path), input_paths={"pool": path},
                      model_paths={}, shards=RayShards())
    step.run(ctx)
    assert ctx.stats["executor"] == "ray" and ctx.stats["shards"] == 3 + lsh_bands(0.8, 128)[0]
    for name in ("main", "removed"):
        assert pl.read_parquet(out / "tables" / f"{name}.parquet").equals(local[name]), name
