"""A toy generation backend and a toy BYOD metric, each added with one decorator, the way a
contributor adds theirs (tests/test_registry.py registers them and takes them out again)."""

from __future__ import annotations

from datagen import backends
from datagen.backends.base import BackendStats, GenResult
from evals import byod


@backends.register("toy")
class ToyBackend:
    """Answers every request with the same question and answer; loads no model."""

    def __init__(self, model_dir=None, **settings):
        self.stats = BackendStats()

    def generate(self, requests, on_result) -> None:
        for r in requests:
            result = GenResult(id=r.id, text=f"Question: what is {r.seed} + 1?\nAnswer: {r.seed + 1}",
                               tokens_in=1, tokens_out=6, finish_reason="stop")
            self.stats.count(result)
            on_result(result)


@byod.register_metric("toy_length", aggregation="median")
def toy_length(model, tokenizer, texts, rng, max_examples, batch_size, torch):
    """Each text's length in characters: no model needed."""
    rows = [{"index": i, "score": float(len(t)), "original": t, "perturbed": t}
            for i, t in enumerate(texts[:max_examples])]
    return rows, {}
