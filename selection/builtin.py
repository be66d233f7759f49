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
