"""The interface every generation backend implements.

The generate step turns rendered generator prompts into `GenRequest`s and hands them to a
backend, which calls `on_result` once per request as soon as it is finished (success or
final failure). The step appends each result to its resumable shards inside `on_result`, so
a kill at any moment loses at most the requests in flight, which are simply sent again.
Backends never write files and never decide what is cached: that is the step's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol


@dataclass(frozen=True)
class GenRequest:
    id: str  # hash of the rendered messages, sampling params and seed: the resume key
    messages: list[dict]  # chat messages [{role, content}]
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int | None = None  # per-request seed (servers that support it; local sampling)


@dataclass
class GenResult:
    id: str
    text: str | None  # None when the request failed for good
    error: str | None = None  # why it failed (after retries), e.g. "HTTP 500 after 6 attempts"
    tokens_in: int = 0
    tokens_out: int = 0
    attempts: int = 1
    finish_reason: str | None = None


@dataclass
class BackendStats:
    sent: int = 0  # requests attempted at least once
    retried: int = 0  # extra attempts
    failed: int = 0  # requests given up on
    tokens_in: int = 0
    tokens_out: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def count(self, result: "GenResult") -> None:
        """Account for one request a backend sent once (local backends: no retries)."""
        self.sent += 1
        self.tokens_in += result.tokens_in
        self.tokens_out += result.tokens_out


class Backend(Protocol):
    stats: BackendStats

    def generate(self, requests: Iterable[GenRequest], on_result: Callable[[GenResult], None]) -> None:
        """Run every request; call `on_result` (from the calling thread) for each as it finishes."""
