"""The built-in methods as `select` sees them (see selection/methods.py for the contract)."""

from __future__ import annotations

import numpy as np


def zipfit(candidates: list[str], targets: list[str], *, level: int = 9, workers: int | None = None,
           progress=None) -> np.ndarray:
    """ZIP-FIT: gzip-based alignment with the targets (selection/zipfit.py)."""
    from selection.zipfit import zipfit_scores

    return zipfit_scores(candidates, targets, level=level, workers=workers, progress=progress)


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
            progress=None) -> np.ndarray:
    """Log density of each candidate under a Gaussian KDE of the targets' embeddings
    (selection/density.py); the step's `model` (if set) embeds instead of all-MiniLM-L6-v2."""
    from selection.density import embed, log_density_of, minilm_folder

    folder = model_dir or minilm_folder()
    return log_density_of(embed(candidates, folder, batch_size=batch_size, progress=progress),
                          embed(targets, folder, batch_size=batch_size), bandwidth)
