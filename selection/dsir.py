"""DSIR (Xie et al. 2023): data selection by hashed n-gram importance resampling, through its
authors' package `data-selection` (`HashedNgramDSIR`), the baseline ZIP-FIT's paper compares with.

DSIR fits bag-of-hashed-n-grams distributions on the raw pool and on the target, and gives each
candidate the log importance weight log p_target(x) - log p_raw(x). Its `resample` then draws
the budget without replacement with probability proportional to the weights (Gumbel top-k). As a
`select` method the score is that log weight plus, by default, seeded Gumbel noise, so taking the
top budget *is* DSIR's resampling (`top_k: true`: the weights alone, DSIR's deterministic
variant). Everything else (tokenisation, hashing, fitting, weights) is the package's code.

Differences from the package's defaults, both settable: `min_example_length` is 0, not 100 words
(instruction rows are short; with 100 most would be left out), and examples below it are ranked
last rather than dropped, so every candidate keeps a score.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SHORT_PENALTY = 1e9  # subtracted from the scores of examples below min_example_length


def dsir_log_weights(candidates: list[str], targets: list[str], work_dir: Path, *, ngrams: int = 2,
                     num_buckets: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """(log importance weight, length in words) per candidate, computed by `data-selection`.

    In this process (num_proc=1): in joblib's worker processes nltk 3.10's tokenizer fails
    ("timeout not float or None") when the caller has imported it first, and the n-gram
    counting takes ~1 s per 10,000 short rows anyway."""
    try:
        from data_selection import HashedNgramDSIR
    except ImportError:
        raise ImportError("method dsir needs the data-selection package: pip install data-selection") from None
    if not targets:
        raise ValueError("DSIR needs at least one target text")
    work_dir = Path(work_dir)
    shutil.rmtree(work_dir, ignore_errors=True)  # stale weights of an interrupted run must not be read
    work_dir.mkdir(parents=True)
    raw, target = work_dir / "raw.jsonl", work_dir / "target.jsonl"
    for path, texts in ((raw, candidates), (target, targets)):
        with open(path, "w") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
    with _no_tqdm():
        dsir = HashedNgramDSIR([str(raw)], [str(target)], cache_dir=str(work_dir / "cache"), num_proc=1,
                               ngrams=ngrams, num_buckets=num_buckets, min_example_length=0)
        dsir.fit_importance_estimator(num_tokens_to_fit="auto")
        dsir.compute_importance_weights()
    # The package shards a file virtually (example i goes to shard i % num_shards) and saves each
    # shard's weights and lengths as <overall_idx>.npy: put them back in row order.
    weights = np.empty(len(candidates), dtype=np.float64)
    lengths = np.empty(len(candidates), dtype=np.float64)
    for shard in dsir._get_virtually_sharded_datasets(dsir.raw_datasets):
        rows = slice(shard["shard_idx"], None, shard["num_shards"])
        weights[rows] = np.load(dsir.log_importance_weights_dir / f"{shard['overall_idx']}.npy")
        lengths[rows] = np.load(dsir.perexample_metadata_dir / f"{shard['overall_idx']}.npy")
    return weights, lengths


def dsir_scores(candidates: list[str], targets: list[str], work_dir: Path, *, seed: int = 0, top_k: bool = False,
                ngrams: int = 2, num_buckets: int = 10_000, min_example_length: int = 0) -> np.ndarray:
    """Scores whose top budget is DSIR's importance resample (or its top-k with `top_k`)."""
    weights, lengths = dsir_log_weights(candidates, targets, work_dir, ngrams=ngrams, num_buckets=num_buckets)
    scores = weights.copy()
    if not top_k:  # Gumbel top-k: sampling without replacement with p proportional to exp(weight)
        scores += np.random.default_rng(seed).gumbel(size=len(scores))
    scores[lengths < min_example_length] -= SHORT_PENALTY
    return scores


@contextmanager
def _no_tqdm():
    """The package draws a tqdm bar per shard; datamill shows its own: its modules' `tqdm` is a
    pass-through for the duration."""
    import data_selection.base as base
    import data_selection.hashed_ngram_dsir as hashed

    saved = base.tqdm, hashed.tqdm
    base.tqdm = hashed.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        base.tqdm, hashed.tqdm = saved
