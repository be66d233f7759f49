"""A generation backend for tests: canned outputs, no model. Tests select it by pointing
`datagen.backends.BACKENDS["transformers"]` at "fake_backend:FakeBackend".

Class attributes steer it (reset them with `FakeBackend.reset()`):
    calls        the request ids of every `generate` call, in order
    fail         request ids to report as failed (text None, error set)
    malformed    every request whose seed % malformed == malformed - 1 gets text that does not parse
    truncate     request ids whose output is cut off (finish_reason "length")
    delay_s      sleep before each result (for kill tests)
"""

from __future__ import annotations

import time

from datagen.backends.base import BackendStats, GenResult


class FakeBackend:
    calls: list[list[str]] = []
    fail: set[str] = set()
    malformed: int = 5
    truncate: set[str] = set()
    delay_s: float = 0.0
    constructed: list[dict] = []

    @classmethod
    def reset(cls) -> None:
        cls.calls, cls.fail, cls.truncate, cls.constructed = [], set(), set(), []
        cls.malformed, cls.delay_s = 5, 0.0

    def __init__(self, model_dir=None, batch_size=16, dtype="auto", device="auto", progress_desc="generate"):
        type(self).constructed.append({"model_dir": model_dir, "batch_size": batch_size})
        self.stats = BackendStats()

    def generate(self, requests, on_result) -> None:
        requests = list(requests)
        type(self).calls.append([r.id for r in requests])
        for r in requests:
            if self.delay_s:
                time.sleep(self.delay_s)
            self.stats.sent += 1
            if r.id in self.fail:
                self.stats.failed += 1
                on_result(GenResult(id=r.id, text=None, error="HTTP 500 after 3 attempts", attempts=3))
                continue
            text = canned_text(r)
            self.stats.tokens_in += 10
            self.stats.tokens_out += len(text.split())
            on_result(GenResult(id=r.id, text=text, tokens_in=10, tokens_out=len(text.split()),
                                finish_reason="length" if r.id in self.truncate else "stop"))
        self.stats.seconds = 0.01


def canned_text(r) -> str:
    prompt = r.messages[-1]["content"]
    if FakeBackend.malformed and r.seed % FakeBackend.malformed == FakeBackend.malformed - 1:
        return "Sure! Here is a list of topics:\n1. Cells\n2. Atoms\nI hope this helps."
    if "multiple-choice" in prompt:
        return (f"1. Biology\n2. History\n\nQuestion: Which number is {r.seed}?\nA) {r.seed}\nB) {r.seed + 1}\n"
                f"C) {r.seed + 2}\nD) {r.seed + 3}\nAnswer: A")
    if "conversation" in prompt:
        return (f"User: Tell me about item {r.seed}.\nAssistant: Item {r.seed} is a number.\n"
                f"User: Is it even?\nAssistant: {'Yes' if r.seed % 2 == 0 else 'No'}.")
    return f"1. Topic one\n2. Topic two\n\n**Question:** What is {r.seed} + 1?\n**Answer:** {r.seed + 1}."
