"""`generate`: GenQA-style generation. A handful of generator prompts become many instruction examples.

Request k (0 <= k < n) uses prompt `prompts[k % len(prompts)]`, the index (and subindex) that
prompt family injects, drawn from `random.Random(f"{seed}:{k}")`, and the sampling seed
`seed * 1_000_003 + k`. Its id hashes the rendered messages, sampling params, seed and model
identity, so request k is the same request whatever `n` is.

Finished requests go to a request cache shared by every key of the workspace
(`<workspace>/shared/generate/<backend>/<model>/shard-*.jsonl`, each with a compact index, see
datagen/shards.py): a run sends only the requests without a successful result there. A run killed at
any point resumes where it stopped, raising `n` from 1000 to 1500 sends 500 requests, and failed
requests are tried again the next time the step runs (`max_failed_fraction: 0` fails the step
instead, so that re-running the same spec retries them). The step works window by window (plan,
send what the cache lacks, write the rows read back from the cache), so memory holds one window of
requests and the cache's index (~25 bytes a request), never all n results.

Each result is parsed by its prompt's parser (datagen/parsing.py) into canonical rows (see
datamill/records.py) plus provenance columns; outputs that do not parse and requests that
failed go to `<step>__rejected` with the reason and the raw text. Rows are in request order,
so a resumed run writes the same table as a clean one.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from datagen import prompt_library
from datagen.backends import BackendName, is_local
from datagen.backends.base import BackendStats, GenRequest, GenResult
from datamill.errors import DatamillError, FieldError
from datamill.hashing import canonical_json, hash_obj
from datamill.secrets import scrub
from datamill.step import Step, StepConfig

SEED_STRIDE = 1_000_003  # seed_k = seed * SEED_STRIDE + k
SAMPLE_ROWS = 50
REJECTED_SAMPLE_ROWS = 20
WINDOW = 65_536  # requests planned, sent and written at a time (times the executor's workers)
TABLE_BATCH = 8_192  # results read back from the request cache at a time to build the tables
PROGRESS_POINTS = 20  # progress metrics (requests done, tokens/s) logged this many times per run
LITERAL_KEY_ERROR = ("a literal api_key is not allowed in a spec: put the key in an environment variable "
                     "and name it with api_key_env")


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


class GenerateConfig(StepConfig):
    """Generate instruction data from generator prompts (GenQA)."""

    model: str
    """Model: a `models:` name or a model reference (transformers, vllm), or the model name the
    server knows (openai)."""
    backend: BackendName = "transformers"
    """Where generation runs: `transformers` (local, CPU or GPU), `openai` (any OpenAI-compatible
    server), `vllm` (vLLM's offline engine; needs `pip install vllm` and a GPU), or a backend you
    registered (datagen/backends)."""
    prompts: list[str] = Field(min_length=1)
    """Generator prompts: names from the library (academic, writing, task, math, multiple_choice,
    dialog, code, general: datagen/prompts/) or paths of your own YAML files, relative to the spec."""
    n: int = Field(gt=0)
    """Number of requests; request k uses prompts[k % len(prompts)]. Raising n sends only the new requests."""
    seed: int = 0
    """Seed of the injected indices and of sampling (request k samples with seed*1000003 + k)."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature (0: greedy)."""
    top_p: float = Field(0.95, gt=0, le=1)
    """Nucleus sampling: keep the most likely tokens up to this probability mass."""
    max_tokens: int = Field(768, ge=1)
    """Most tokens generated per request; the topic lists count too, so leave room for them."""
    keep_truncated: bool = False
    """Keep outputs that hit max_tokens when they still parse. Off: they are rejected (reason kind
    `truncated`), since their last answer may be cut off mid-sentence."""
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


@dataclass(frozen=True)
class PlannedRequest:
    k: int
    prompt: prompt_library.GeneratorPrompt
    draw: prompt_library.Draw
    request: GenRequest


def request_id(messages: list[dict], temperature: float, top_p: float, max_tokens: int, seed: int,
               model: str) -> str:
    """The resume key: equal rendered prompt, sampling params, seed and model give equal ids."""
    import hashlib

    payload = {"messages": messages, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
               "seed": seed, "model": model}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()[:24]


def plan_requests(config: GenerateConfig, prompts: list[prompt_library.GeneratorPrompt], model: str,
                  start: int = 0, stop: int | None = None) -> list[PlannedRequest]:
    """Requests start..stop-1 (default: all n). Request k depends on k, never on n."""
    planned = []
    for k in range(start, config.n if stop is None else stop):
        prompt = prompts[k % len(prompts)]
        draw = prompt.draw(config.seed, k)
        messages = prompt.render(draw)
        seed_k = config.seed * SEED_STRIDE + k
        rid = request_id(messages, config.temperature, config.top_p, config.max_tokens, seed_k, model)
        planned.append(PlannedRequest(k, prompt, draw, GenRequest(
            id=rid, messages=messages, temperature=config.temperature, top_p=config.top_p,
            max_tokens=config.max_tokens, seed=seed_k)))
    return planned


def cache_folder_name(label: str, identity: str) -> str:
    """A readable, filesystem-safe folder name for one model's request cache."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "model"
    return f"{safe[:60]}-{hash_obj(identity, 8)}"


def make_backend(cfg: GenerateConfig, model_dir: Path | None, step_name: str):
    from datagen.backends import backend_class

    cls = backend_class(cfg.backend)
    if not is_local(cfg.backend):
        return cls(cfg.openai, cfg.model)
    return cls(model_dir, batch_size=cfg.batch_size, dtype=cfg.dtype, device=cfg.device,
               progress_desc=f"{step_name}: generate")


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


class GenerateStep(Step):
    """Generate instruction data with an LLM from generator prompts (GenQA)."""

    kind = "generate"
    execution_only = ("batch_size", "device", "max_failed_fraction")
    Config = GenerateConfig
    version = "1"
    side_tables = ("rejected",)

    def model_refs(self):
        return [(("model",), self.config.model)] if is_local(self.config.backend) else []

    def check(self, env) -> None:
        for i, entry in enumerate(self.config.prompts):
            try:
                prompt_library.load(entry, env.base_dir)
            except prompt_library.PromptError as e:
                raise FieldError(("prompts", i), str(e)) from None

    def key_config(self) -> dict:
        config = super().key_config()
        if self.config.backend == "openai":
            for field in ("max_in_flight", "timeout_s", "max_retries", "backoff_s", "api_key_env", "api_key"):
                config["openai"].pop(field)
        else:
            config.pop("openai")
        return config

    def key_material(self, env) -> dict:
        # The prompts' contents decide the output: editing a prompt file reruns the step.
        hashes = []
        for entry in self.config.prompts:
            try:
                hashes.append(prompt_library.load(entry, env.base_dir).hash)
            except prompt_library.PromptError:
                hashes.append(None)  # check() reports it
        return {"prompts": hashes}

    # --- running ---------------------------------------------------------------------------

    def run(self, ctx) -> None:
        import numpy as np

        from datagen.shards import ShardStore

        cfg = self.config
        prompts = [prompt_library.load(entry, ctx.env.base_dir) for entry in cfg.prompts]
        model_dir = None
        if is_local(cfg.backend):
            from datamill.models import model_identity

            model_dir = Path(ctx.model_path(cfg.model))
            identity, label = model_identity(str(model_dir), ctx.env.base_dir), model_dir.name
        else:
            identity, label = f"openai:{cfg.model}", cfg.model

        store = ShardStore(Path(ctx.shared_dir) / "generate" / cfg.backend / cache_folder_name(label, identity))
        index = store.index()  # which requests are finished, and where: ~25 bytes each, no text
        make = _BuiltOnce(functools.partial(make_backend, self._per_task(cfg, ctx.shards.workers), model_dir, ctx.name))
        stats, parts, tally = BackendStats(), [], _Tally()
        todo_count = resent_failed = 0
        fresh: dict = {}  # this window's results from this run: request id -> where store.append put it
        sending = {"since": None}  # when the current window's sends began (stats.seconds: the earlier ones')
        every = max(1, cfg.n // PROGRESS_POINTS)
        started = time.monotonic()

        def log_progress() -> None:
            now_sending = time.monotonic() - sending["since"] if sending["since"] is not None else 0.0
            elapsed = max(stats.seconds + now_sending, 1e-9)
            ctx.log_metrics({"progress.requests_done": stats.sent,
                             "progress.tokens_out_per_s": round(stats.tokens_out / elapsed, 2)}, step=stats.sent)

        def save(_, r: GenResult) -> None:  # at once here; as its shard's task returns on Ray
            stats.count(r)
            stats.retried += r.attempts - 1
            stats.failed += r.text is None
            record = asdict(r)
            for field in ("text", "error"):  # an error may quote request headers: keep keys out of files
                if record[field]:
                    record[field] = scrub(record[field])
            fresh[r.id] = store.append(record)
            if stats.sent % every == 0:
                log_progress()

        # Window by window: plan, send what the cache lacks, then write the window's rows from the
        # cache in request order, so memory holds one window (and the index), never n results.
        # With several workers (Ray) `slices` cuts a window into ~4 tasks per worker, each building its
        # own backend (loading the model): a window that big gives each task about WINDOW requests.
        window = WINDOW * (4 * ctx.shards.workers if ctx.shards.workers > 1 else 1)
        try:
            with ctx.writer() as out, ctx.writer("rejected") as out_rejected:
                for first in range(0, cfg.n, window):
                    planned = plan_requests(cfg, prompts, identity, first, min(cfg.n, first + window))
                    found, finished = index.lookup([p.request.id for p in planned])
                    todo = [p.request for p, done in zip(planned, finished) if not done]
                    todo_count += len(todo)
                    resent_failed += int(np.count_nonzero(found & ~finished))
                    fresh.clear()
                    if todo:  # request shards as executor tasks; this process alone writes the request cache
                        sending["since"] = time.monotonic()
                        parts += ctx.shards.map(generate_shard, ctx.shards.slices(todo), setup={"backend": make},
                                                on_emit=save)
                        stats.seconds += time.monotonic() - sending["since"]
                        sending["since"] = None
                    self._write_tables(ctx, planned, index, fresh, out, out_rejected, tally)
        finally:
            store.close()
        if stats.sent % every:
            log_progress()
        stats.extra = merge_backend_counters(parts)
        seconds = time.monotonic() - started

        self._report(ctx, cfg.n, todo_count, resent_failed, stats, seconds, tally, index.torn_lines)
        ctx.stats.update(ctx.shards.summary())
        self._check_failures(tally, cfg.n)

    def _write_tables(self, ctx, planned: list[PlannedRequest], index, fresh: dict, out, out_rejected,
                      tally: "_Tally") -> None:
        """The rows and rejected rows of these requests, in request order, from their results read
        back from the cache a batch at a time. `fresh`: this run's own results (request id -> where
        its line is), which win over the cache's (an earlier failure of the same request)."""
        for i in range(0, len(planned), TABLE_BATCH):
            batch = planned[i:i + TABLE_BATCH]
            rows, rejected = self._tables(ctx, batch, index.read([p.request.id for p in batch], newer=fresh))
            out.write(rows)
            out_rejected.write(rejected)
            tally.add(rows, rejected)

    def _check_failures(self, tally: "_Tally", total: int) -> None:
        if tally.failed and tally.failed > self.config.max_failed_fraction * total:
            raise DatamillError(
                f"{tally.failed} of {total} requests failed ({tally.first_failure}); the finished ones are "
                "saved in the request cache, so a re-run sends only the failed ones (to accept failures, "
                "raise max_failed_fraction: they then go to the rejected table)")

    @staticmethod
    def _per_task(cfg: GenerateConfig, tasks_at_once: int) -> GenerateConfig:
        """The config a shard's task runs with: `max_in_flight` split between the tasks that run at
        once, so the endpoint sees the concurrency the spec asks for on either executor."""
        if cfg.backend != "openai":
            return cfg
        share = max(1, -(-cfg.openai.max_in_flight // tasks_at_once))
        return cfg.model_copy(update={"openai": cfg.openai.model_copy(update={"max_in_flight": share})})

    def _tables(self, ctx, planned: list[PlannedRequest], results: dict[str, dict]):
        import polars as pl

        from datagen.parsing import ParseError, parse
        from datamill.records import MAX_RAW_CHARS, row_id

        cfg = self.config
        sampling = canonical_json({"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens})
        rows, rejected = [], []
        for p in planned:
            result = results.get(p.request.id)
            common = {"gen_prompt": p.prompt.name, "gen_prompt_hash": p.prompt.hash, "gen_index": p.draw.index,
                      "gen_subindex": p.draw.subindex, "gen_seed": p.request.seed, "request_id": p.request.id}
            text = None if result is None else result.get("text")
            try:
                if result is None:
                    raise ParseError("no result: the backend returned nothing for this request", "no_result")
                if text is None:
                    raise ParseError(f"request failed: {result.get('error') or 'unknown error'}", "request_failed")
                truncated = result.get("finish_reason") == "length"
                try:
                    messages = parse(p.prompt.parser, text)
                except ParseError as e:
                    if truncated:
                        e.reason += f" (the output hit max_tokens={cfg.max_tokens})"
                    raise
                if truncated and not cfg.keep_truncated:
                    raise ParseError(f"the output hit max_tokens={cfg.max_tokens} before it ended: the answer "
                                     "may be cut off (keep_truncated: true keeps such rows)", "truncated")
            except ParseError as e:
                rejected.append({**common, "reason": e.reason, "reason_kind": e.kind,
                                 "raw": (text or "")[:MAX_RAW_CHARS],
                                 "finish_reason": None if result is None else result.get("finish_reason")})
                continue
            rows.append({**common, "id": row_id(messages), "messages": messages, "source": ctx.name,
                         "gen_model": cfg.model, "parent_id": None, "category": p.prompt.category,
                         "gen_topic": p.draw.topic, "gen_sampling": sampling,
                         "gen_finish_reason": result.get("finish_reason")})
        return pl.DataFrame(rows, schema=output_schema()), pl.DataFrame(rejected, schema=rejected_schema())

    def _report(self, ctx, total: int, todo: int, resent_failed: int, stats: BackendStats, seconds: float,
                tally: "_Tally", torn_lines: int) -> None:
        import polars as pl

        failed = tally.failed
        gen_seconds = stats.seconds or seconds
        numbers = {
            "requests_total": total,
            "requests_cached": total - todo,
            "sent": stats.sent,
            "retried": stats.retried,
            "resent_failed": resent_failed,
            "failed": failed,
            "tokens_in": stats.tokens_in,
            "tokens_out": stats.tokens_out,
            "generate_seconds": round(gen_seconds, 3),
            "requests_per_s": round(stats.sent / gen_seconds, 3) if stats.sent and gen_seconds else 0.0,
            "tokens_out_per_s": round(stats.tokens_out / gen_seconds, 2) if stats.tokens_out and gen_seconds else 0.0,
            "parsed": tally.rows,
            "rejected": tally.rejected,
            "parse_rate": round(tally.rows / max(total - failed, 1), 4),
            "torn_lines": torn_lines,
        }
        ctx.stats.update(numbers)
        ctx.stats["rejected_by_reason"] = dict(sorted(tally.by_reason.items()))
        if stats.extra:
            ctx.stats["backend"] = stats.extra
        # The stats are logged as metrics by the tracker (`<step>.sent`, `<step>.rejected_by_reason.<kind>`).
        rows, rejected = tally.rows_head, tally.rejected_head
        if rows is not None and rows.height:
            ctx.log_sample(rows.select(
                pl.col("messages").list.first().struct.field("content").alias("user"),
                pl.col("messages").list.last().struct.field("content").alias("assistant"),
                "gen_prompt", "category", "gen_index", "gen_subindex", "gen_topic", "gen_finish_reason", "request_id",
            ), rows=SAMPLE_ROWS)
        if rejected is not None and rejected.height:
            ctx.log_sample(rejected.select("reason_kind", "reason", "raw", "gen_prompt", "request_id"),
                           name="rejected_sample", rows=REJECTED_SAMPLE_ROWS)


class _BuiltOnce:
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


@dataclass
class _Tally:
    """What the report and the failure check need of the tables, gathered as batches are written."""

    rows: int = 0
    rejected: int = 0
    by_reason: dict = dc_field(default_factory=dict)
    failed: int = 0  # requests that failed or got no result
    first_failure: Optional[str] = None  # the first one's reason, in request order
    rows_head: Any = None  # the first rows and rejected rows, for the logged samples
    rejected_head: Any = None

    def add(self, rows, rejected) -> None:
        import polars as pl

        self.rows += rows.height
        self.rejected += rejected.height
        for kind, count in rejected.group_by("reason_kind").len().iter_rows():
            self.by_reason[kind] = self.by_reason.get(kind, 0) + count
        failed = rejected.filter(rejected["reason_kind"].is_in(["request_failed", "no_result"]))
        self.failed += failed.height
        if self.first_failure is None and failed.height:
            self.first_failure = failed["reason"][0]
        self.rows_head = rows.head(SAMPLE_ROWS) if self.rows_head is None else (
            pl.concat([self.rows_head, rows.head(SAMPLE_ROWS - self.rows_head.height)]))
        self.rejected_head = rejected.head(REJECTED_SAMPLE_ROWS) if self.rejected_head is None else (
            pl.concat([self.rejected_head, rejected.head(REJECTED_SAMPLE_ROWS - self.rejected_head.height)]))


def output_schema() -> dict:
    import polars as pl

    from datamill.records import INSTRUCTION_SCHEMA

    return {**INSTRUCTION_SCHEMA, "category": pl.String, "gen_prompt_hash": pl.String, "gen_index": pl.Int64,
            "gen_subindex": pl.Int64, "gen_topic": pl.String, "gen_sampling": pl.String,
            "gen_finish_reason": pl.String, "request_id": pl.String}


def rejected_schema() -> dict:
    import polars as pl

    return {"request_id": pl.String, "gen_prompt": pl.String, "gen_prompt_hash": pl.String, "gen_index": pl.Int64,
            "gen_subindex": pl.Int64, "gen_seed": pl.Int64, "reason": pl.String, "reason_kind": pl.String,
            "raw": pl.String, "finish_reason": pl.String}

