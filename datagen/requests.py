"""What the steps that send LLM requests share (`generate`, `judge`): the backend settings of a
config, the request id (the resume key), the request cache's folder, and `RequestCache`, the
loop that sends only what the cache lacks.

A step works window by window: it plans a window of `GenRequest`s, calls `cache.send(requests)`,
which looks them up in the request cache (datagen/shards.py) and sends the missing or failed ones
through the backend (as executor shards: one backend per process locally, one per task on Ray),
appending each result to the cache as it arrives; then it reads the window's results back with
`cache.read(ids)` and writes its rows. Memory holds one window and the cache's index, never every
result. Finished requests are never sent twice: a killed run resumes, a grown run sends only the
new requests, and a second step asking what a first one asked (the same messages, sampling, seed
and model) gets the cached answer.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator

from datagen.backends import BackendName, is_local
from datagen.backends.base import BackendStats, GenRequest, GenResult
from datamill.hashing import canonical_json, hash_obj
from datamill.secrets import scrub
from datamill.step import StepConfig

PROGRESS_POINTS = 20  # progress metrics (requests done, tokens/s) logged this many times per run
LITERAL_KEY_ERROR = ("a literal api_key is not allowed in a spec: put the key in an environment variable "
                     "and name it with api_key_env")
# Fields of `openai:` that change how requests are sent, not what comes back: out of the cache key.
OPENAI_EXECUTION_FIELDS = ("max_in_flight", "timeout_s", "max_retries", "backoff_s", "api_key_env", "api_key")


class OpenAIConfig(StepConfig):
    """An OpenAI-compatible chat completions server (OpenAI, vLLM serve, llama.cpp, TGI, ...)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """Server URL up to and including /v1."""
    api_key_env: Optional[str] = None
    """Name of the environment variable holding the API key (none: send no key, as local servers expect)."""
    api_key: Optional[str] = None
    """Not allowed: a key written in a spec ends up in git and logs. Use `api_key_env`."""
    max_in_flight: int = Field(64, ge=1, le=4096)
    """Requests sent concurrently (in all: on a Ray executor each of the tasks running at once
    sends its share). Does not change the results (not part of the cache key)."""
    timeout_s: float = Field(120, gt=0)
    """Seconds to wait for one response before retrying it."""
    max_retries: int = Field(6, ge=0)
    """Retries of a request after errors (timeouts, HTTP 429/5xx); then it is recorded as failed and
    tried again on the next run."""
    backoff_s: float = Field(1.0, ge=0)
    """First wait between retries, doubled each time (with jitter)."""

    @field_validator("api_key")
    @classmethod
    def _no_literal_key(cls, value):
        if value is not None:
            raise ValueError(LITERAL_KEY_ERROR)
        return value


class BackendConfig(StepConfig):
    """The settings of a step that sends requests to an LLM through a generation backend."""

    model: str
    """Model: a `models:` name or a model reference (transformers, vllm), or the model name the
    server knows (openai)."""
    backend: BackendName = "transformers"
    """Where generation runs: `transformers` (local, CPU or GPU), `openai` (any OpenAI-compatible
    server), `vllm` (vLLM's offline engine; needs `pip install vllm` and a GPU), or a backend you
    registered (datagen/backends)."""
    max_failed_fraction: float = Field(1.0, ge=0, le=1)
    """Share of requests that may fail for good (after the backend's retries) with the step still
    succeeding. Failed requests go to the rejected table (reason kind `request_failed`) and are
    sent again the next time the step runs (e.g. with a larger n). Above this share the step fails
    instead, every finished request stays in the request cache, and re-running the same spec sends
    only the failed ones: set 0 to insist on every request. Not part of the cache key."""
    batch_size: int = Field(16, ge=1)
    """transformers: requests per batch; vllm: at least this many per engine call. Not part of the cache key."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype for local backends (auto: float32 on CPU, bfloat16/float16 on GPU)."""
    device: str = "auto"
    """transformers: cpu, cuda, cuda:1, mps (auto: cuda when available). Not part of the cache key."""
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig)
    """Server settings for backend: openai."""


EXECUTION_ONLY = ("batch_size", "device", "max_failed_fraction")  # BackendConfig fields out of the cache key


def backend_key_config(config: dict, backend: str) -> dict:
    """A dumped BackendConfig as it enters the cache key: the server's URL counts, how requests are
    sent does not; without the openai backend, the `openai:` section does not count at all."""
    if backend == "openai":
        for field in OPENAI_EXECUTION_FIELDS:
            config["openai"].pop(field)
    else:
        config.pop("openai")
    return config


def request_id(messages: list[dict], temperature: float, top_p: float, max_tokens: int, seed: int,
               model: str) -> str:
    """The resume key: equal rendered prompt, sampling params, seed and model give equal ids."""
    import hashlib

    payload = {"messages": messages, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
               "seed": seed, "model": model}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()[:24]


def stable_seed(*parts) -> int:
    """A sampling seed in [0, 2**31) from the given parts (e.g. a config seed, a row id, a sample
    number): the same in every process, and fits any server's seed field."""
    import hashlib

    digest = hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def split_last_turn(value) -> tuple[list[dict], Optional[str]]:
    """(the conversation before its last assistant turn, that turn's content or None) of a message
    list; a plain string is one user message without a reply; None is an empty conversation."""
    if value is None:
        return [], None
    if isinstance(value, str):
        return [{"role": "user", "content": value}], None
    messages = [{"role": m["role"], "content": m["content"]} for m in value]
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def cache_folder_name(label: str, identity: str) -> str:
    """A readable, filesystem-safe folder name for one model's request cache."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "model"
    return f"{safe[:60]}-{hash_obj(identity, 8)}"


def model_identity(cfg: BackendConfig, ctx) -> tuple[str, str, Path | None]:
    """(identity, label, model folder) of a config's model: the identity goes into request ids,
    so that a request cached for one model is never an answer for another."""
    if is_local(cfg.backend):
        from datamill.models import model_identity as identity_of

        model_dir = Path(ctx.model_path(cfg.model))
        return identity_of(str(model_dir), ctx.env.base_dir), model_dir.name, model_dir
    return f"openai:{cfg.model}", cfg.model, None


def cache_folder(ctx, cfg: BackendConfig, identity: str, label: str) -> Path:
    """The request cache of a model, shared by every step and key of the workspace."""
    return Path(ctx.shared_dir) / "generate" / cfg.backend / cache_folder_name(label, identity)


def make_backend(cfg: BackendConfig, model_dir: Path | None, step_name: str):
    from datagen.backends import backend_class

    cls = backend_class(cfg.backend)
    if not is_local(cfg.backend):
        return cls(cfg.openai, cfg.model)
    return cls(model_dir, batch_size=cfg.batch_size, dtype=cfg.dtype, device=cfg.device,
               progress_desc=f"{step_name}: generate")


def per_task(cfg: BackendConfig, tasks_at_once: int) -> BackendConfig:
    """The config a shard's task runs with: `max_in_flight` split between the tasks that run at
    once, so the endpoint sees the concurrency the spec asks for on either executor."""
    if cfg.backend != "openai":
        return cfg
    share = max(1, -(-cfg.openai.max_in_flight // tasks_at_once))
    return cfg.model_copy(update={"openai": cfg.openai.model_copy(update={"max_in_flight": share})})


def generate_shard(requests: list[GenRequest], *, backend, emit) -> dict:
    """One shard of requests, each result emitted as it finishes: `backend` is the shards' `setup`
    (one for all shards here, one per task on Ray). Returns the backend's own counters."""
    backend.generate(requests, emit)
    return backend.stats.extra


def merge_backend_counters(parts: list[dict]) -> dict:
    """The backends' counters of every shard: "peak_*" the largest, other numbers summed. A backend
    shared by the shards (locally) returns the same dict each time: counted once."""
    merged: dict = {}
    for part in {id(p): p for p in parts}.values():
        for key, value in part.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] = max(merged.get(key, value), value) if key.startswith("peak") else merged.get(key, 0) + value
    return merged


class BuiltOnce:
    """A backend factory that builds once per process: the windows of a run share one backend here
    (one model load); a Ray task gets it pickled without what it built, and builds its own."""

    def __init__(self, make):
        self.make, self.built = make, None

    def __call__(self):
        if self.built is None:
            self.built = self.make()
        return self.built

    def __getstate__(self):
        return {"make": self.make, "built": None}


class RequestCache:
    """The request cache of one model, opened for one run of a step (module docstring):

        with RequestCache(ctx, cfg, total=n) as cache:
            for window in windows:
                cache.send(requests)          # what the cache lacks, through the backend
                results = cache.read(ids)     # request id -> record (text, error, finish_reason, ...)
        cache.stats, cache.todo, cache.resent_failed   # for the step's report
    """

    def __init__(self, ctx, cfg: BackendConfig, total: int):
        from datagen.shards import ShardStore

        self.ctx = ctx
        self.identity, label, model_dir = model_identity(cfg, ctx)
        self.store = ShardStore(cache_folder(ctx, cfg, self.identity, label))
        self.index = self.store.index()  # which requests are finished, and where: ~25 bytes each, no text
        self.make = BuiltOnce(functools.partial(make_backend, per_task(cfg, ctx.shards.workers), model_dir, ctx.name))
        self.stats, self.parts = BackendStats(), []
        self.todo = self.resent_failed = 0
        self.fresh: dict = {}  # this window's results from this run: request id -> where store.append put it
        self._sending_since: float | None = None  # when the current sends began (stats.seconds: the earlier ones')
        self._every = max(1, total // PROGRESS_POINTS)
        self.started = time.monotonic()

    def window(self, base: int) -> int:
        """Requests per window: `base`, times ~4 tasks per worker on an executor with several
        workers (each task builds its own backend: a window that big gives each about `base`)."""
        workers = self.ctx.shards.workers
        return base * (4 * workers if workers > 1 else 1)

    def send(self, requests: list[GenRequest]) -> None:
        """Send the requests the cache has no successful result for (each id once), appending the
        results to the cache as they arrive."""
        import numpy as np

        found, finished = self.index.lookup([r.id for r in requests])
        todo = list({r.id: r for r, done in zip(requests, finished) if not done}.values())
        self.todo += len(todo)
        self.resent_failed += int(np.count_nonzero(found & ~finished))
        self.fresh.clear()
        if not todo:
            return
        # request shards as executor tasks; this process alone writes the request cache
        self._sending_since = time.monotonic()
        shards = self.ctx.shards
        self.parts += shards.map(generate_shard, shards.slices(todo), setup={"backend": self.make}, on_emit=self._save)
        self.stats.seconds += time.monotonic() - self._sending_since
        self._sending_since = None

    def read(self, ids: list[str]) -> dict[str, dict]:
        """The finished records of these ids (this run's own results win over the cache's)."""
        return self.index.read(ids, newer=self.fresh)

    def _save(self, _, r: GenResult) -> None:  # at once here; as its shard's task returns on Ray
        self.stats.count(r)
        self.stats.retried += r.attempts - 1
        self.stats.failed += r.text is None
        record = asdict(r)
        for field in ("text", "error"):  # an error may quote request headers: keep keys out of files
            if record[field]:
                record[field] = scrub(record[field])
        self.fresh[r.id] = self.store.append(record)
        if self.stats.sent % self._every == 0:
            self._log_progress()

    def _log_progress(self) -> None:
        now_sending = time.monotonic() - self._sending_since if self._sending_since is not None else 0.0
        elapsed = max(self.stats.seconds + now_sending, 1e-9)
        self.ctx.log_metrics({"progress.requests_done": self.stats.sent,
                              "progress.tokens_out_per_s": round(self.stats.tokens_out / elapsed, 2)},
                             step=self.stats.sent)

    def close(self) -> None:
        self.store.close()
        if self.stats.sent % self._every:
            self._log_progress()
        self.stats.extra = merge_backend_counters(self.parts)

    def numbers(self, total: int, failed: int) -> dict:
        """The request counters of the step's stats (logged as metrics by the tracker)."""
        stats = self.stats
        seconds = stats.seconds or (time.monotonic() - self.started)
        return {
            "requests_total": total,
            "requests_cached": total - self.todo,
            "sent": stats.sent,
            "retried": stats.retried,
            "resent_failed": self.resent_failed,
            "failed": failed,
            "tokens_in": stats.tokens_in,
            "tokens_out": stats.tokens_out,
            "generate_seconds": round(seconds, 3),
            "requests_per_s": round(stats.sent / seconds, 3) if stats.sent and seconds else 0.0,
            "tokens_out_per_s": round(stats.tokens_out / seconds, 2) if stats.tokens_out and seconds else 0.0,
            "torn_lines": self.index.torn_lines,
        }

    def __enter__(self) -> "RequestCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def failure_error(failed: int, total: int, first_failure: str | None):
    """The error a step raises when more requests failed than `max_failed_fraction` allows."""
    from datamill.errors import DatamillError

    return DatamillError(
        f"{failed} of {total} requests failed ({first_failure}); the finished ones are "
        "saved in the request cache, so a re-run sends only the failed ones (to accept failures, "
        "raise max_failed_fraction: they then go to the rejected table)")
