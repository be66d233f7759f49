"""The built-in methods as `select` sees them (see selection/methods.py for the contract)."""

from __future__ import annotations

import functools

import numpy as np


def zipfit(candidates: list[str], targets: list[str], *, level: int = 9, mode: str = "exact",
           workers: int | None = None, progress=None, shards=None) -> np.ndarray:
    """ZIP-FIT: gzip-based alignment with the targets (selection/zipfit.py); `mode`: exact | fast.
    The candidates are scored in slices, the executor's shards (one Ray task each on Ray; a
    candidate's score does not depend on the others, so the scores are those of one pass), each
    in `workers` threads or processes (at most the shard's CPUs; default: all of them)."""
    cpus = _runner(shards).cpus_per_shard
    return _sliced(shards, functools.partial(_zipfit_slice, targets=targets, level=level, mode=mode,
                                             workers=min(workers, cpus) if workers else cpus),
                   candidates, progress=progress)


def _runner(shards):
    from datamill.shards import LocalShards

    return LocalShards() if shards is None else shards


def _sliced(shards, fn, items: list, *, align: int = 1, progress=None) -> np.ndarray:
    """`fn` over slices of `items` (at least 256: a task must be worth its scheduling) as the
    executor's shards (here, one after the other, without `shards`), the results concatenated
    in order."""
    shards = _runner(shards)
    slices = shards.slices(items, minimum=256, align=align) or [items]  # none: fn says what empty is
    return np.concatenate(shards.map(fn, slices, on_emit=(lambda _, n: progress(n)) if progress else None))


def _zipfit_slice(candidates: list[str], *, targets: list[str], level: int, mode: str, workers: int,
                  emit=None) -> np.ndarray:
    from selection.zipfit import zipfit_scores

    return zipfit_scores(candidates, targets, level=level, mode=mode, workers=workers, progress=emit)


def _embed_slice(texts: list[str], *, folder, batch_size: int, emit=None) -> np.ndarray:
    from selection.density import embed

    return embed(texts, folder, batch_size=batch_size, progress=emit)


def random_scores(candidates: list[str], targets: list[str], *, seed: int = 0) -> np.ndarray:
    """Uniform random scores from the seed: the baseline every method must beat."""
    return np.random.default_rng(seed).random(len(candidates))


def length(candidates: list[str], targets: list[str], *, longest: bool = True) -> np.ndarray:
    """Characters of text: longest first (Zhao et al. 2024, "Long Is More for Alignment"), or
    shortest with `longest: false`. Ignores the targets."""
    sizes = np.asarray([len(c) for c in candidates], dtype=np.float64)
    return sizes if longest else -sizes


def dsir(candidates: list[str], targets: list[str], *, work_dir, seed: int = 0, top_k: bool = False,
         ngrams: int = 2, num_buckets: int = 10_000, min_example_length: int = 0) -> np.ndarray:
    """DSIR: hashed n-gram importance weights from the `data-selection` package (selection/dsir.py)."""
    from selection.dsir import dsir_scores

    return dsir_scores(candidates, targets, work_dir / "dsir", seed=seed, top_k=top_k, ngrams=ngrams,
                       num_buckets=num_buckets, min_example_length=min_example_length)


def density(candidates: list[str], targets: list[str], *, model_dir=None, bandwidth="median", batch_size: int = 64,
            progress=None, shards=None) -> np.ndarray:
    """Log density of each candidate under a Gaussian KDE of the targets' embeddings
    (selection/density.py); the step's `model` (if set) embeds instead of all-MiniLM-L6-v2.
    The candidates are embedded in slices of whole batches, the executor's shards (one Ray task
    each on Ray; the same batches as in one pass, so the same embeddings)."""
    from selection.density import embed, log_density_of, minilm_folder

    folder = model_dir or minilm_folder()
    embedded = _sliced(shards, functools.partial(_embed_slice, folder=folder, batch_size=batch_size), candidates,
                       align=batch_size, progress=progress)
    return log_density_of(embedded, embed(targets, folder, batch_size=batch_size), bandwidth)


def less(candidates: list[str], targets: list[str], **context_and_params) -> np.ndarray:
    """LESS: warm up LoRA on a slice of the pool, then score candidates by the lr-weighted cosine
    of their Adam-aware gradients with the targets' gradients. Its params and defaults are
    `run_less`'s (selection/less_method.py). Needs the step's `model`. The candidates' gradient
    features are computed in slices, the executor's shards (one Ray task each on Ray; aligned to
    the batches and projection chunks of one pass, so the scores are the same)."""
    from selection.less_method import run_less

    context_and_params.pop("work_dir", None)  # LESS keeps its datastore in cache_dir
    return run_less(candidates, targets, **context_and_params)


def perplexity(candidates: list[str], targets: list[str], *, model_dir, prefer: str = "low", batch_size: int = 16,
               max_length: int = 512, progress=None) -> np.ndarray:
    """Perplexity under a reference model (the step's `model`), a target-agnostic baseline: each
    text's mean token negative log-likelihood; `prefer: low` keeps the most predictable texts
    first (score = -NLL), `high` the most surprising."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir is None:
        raise ValueError("method perplexity needs a reference model: set `model:` in the select step")
    if prefer not in ("low", "high"):
        raise ValueError(f"prefer: expected 'low' or 'high', found {prefer!r}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll = []
    with torch.no_grad():
        for start in range(0, len(candidates), batch_size):
            texts = [t if t else (tokenizer.eos_token or " ") for t in candidates[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            logits = model(**batch).logits[:, :-1].float()
            targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
            per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
            counts = (targets != -100).sum(1)
            # a one-token text has nothing to predict: NLL 0, ranked as the most predictable
            nll.extend((per_token.sum(1) / counts.clamp(min=1)).tolist())
            if progress:
                progress(len(texts))
    nll = np.asarray(nll, dtype=np.float64)
    return -nll if prefer == "low" else nll
