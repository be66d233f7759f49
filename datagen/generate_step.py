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

`samples: k` samples k responses per request: sample s of request k uses its own seed (sample 0
the seed above, so its request, and its cached result, are those of a run without samples).

Responding to a table (`input:` instead of `prompts:`): each row's conversation (`column`, a
message list whose last assistant turn, if any, is dropped; or a string, one user message) is the
prompt, sent as is, and each of its k samples is one request with the seed
`stable_seed(seed, row id, s)`: a function of the row's `id`, not of its position, so reordering
or adding rows leaves the other rows' requests (and their cache entries) as they were. An output
row is the prompt plus the sampled reply (the raw text, stripped; no parser), with `parent_id` =
the input row's id, `sample` = s, and every other input column carried over unchanged (a task
row's `answer` and `family`, so a later step can verify the reply). The input is read a window of
rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Optional

from pydantic import Field, model_validator

from datagen import prompt_library
from datagen.backends import is_local
from datagen.backends.base import GenRequest
from datagen.requests import (  # noqa: F401  (re-exported: the generate step's names since the start)
    EXECUTION_ONLY, LITERAL_KEY_ERROR, PROGRESS_POINTS, BackendConfig, OpenAIConfig, RequestCache,
    backend_key_config, cache_folder_name, failure_error, generate_shard, make_backend, merge_backend_counters,
    per_task, request_id, split_last_turn, stable_seed)
from datagen.requests import BuiltOnce as _BuiltOnce  # noqa: F401
from datamill.errors import DatamillError, FieldError
from datamill.hashing import canonical_json
from datamill.step import Step

SEED_STRIDE = 1_000_003  # seed_k = seed * SEED_STRIDE + k
SAMPLE_ROWS = 50
REJECTED_SAMPLE_ROWS = 20
WINDOW = 65_536  # requests planned, sent and written at a time (times the executor's workers)
TABLE_BATCH = 8_192  # results read back from the request cache at a time to build the tables
# Columns an output row of input mode gets from the step; the input's other columns are carried over.
RESPONSE_COLUMNS = ("sample", "request_id", "gen_finish_reason")


class GenerateConfig(BackendConfig):
    """Generate instruction data from generator prompts (GenQA), or responses to a table's prompts."""

    prompts: Optional[list[str]] = Field(None, min_length=1)
    """Generator prompts: names from the library (academic, writing, task, math, multiple_choice,
    dialog, code, general: datagen/prompts/) or paths of your own YAML files, relative to the spec.
    Give either `prompts` (with `n`) or `input`."""
    n: Optional[int] = Field(None, gt=0)
    """Number of requests (with `prompts`); request k uses prompts[k % len(prompts)]. Raising n sends
    only the new requests."""
    input: Optional[str] = None
    """A table whose rows are prompts to respond to (instead of `prompts`): each row's `column` is
    the prompt; the outputs keep the row's other columns and point at it with `parent_id`."""
    column: str = "messages"
    """With `input`: the column holding each row's conversation, a list of {role, content} (a last
    assistant turn is dropped to form the prompt) or a string (one user message)."""
    samples: int = Field(1, ge=1)
    """Responses sampled per prompt, each with its own seed. Raising it sends only the new samples;
    sample 0 is the request a run without samples makes."""
    seed: int = 0
    """Seed of the injected indices and of sampling (request k samples with seed*1000003 + k; with
    `input`, sample s of a row with seed hash(seed, row id, s))."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature (0: greedy)."""
    top_p: float = Field(0.95, gt=0, le=1)
    """Nucleus sampling: keep the most likely tokens up to this probability mass."""
    max_tokens: int = Field(768, ge=1)
    """Most tokens generated per request; the topic lists count too, so leave room for them."""
    keep_truncated: bool = False
    """Keep outputs that hit max_tokens when they still parse. Off: they are rejected (reason kind
    `truncated`), since their last answer may be cut off mid-sentence."""

    @model_validator(mode="after")
    def _prompts_or_input(self):
        if self.prompts is not None and self.input is not None:
            raise ValueError("give either `prompts` (GenQA: generator prompts, with `n`) or `input` (a table "
                             "of prompts to respond to), not both")
        if self.prompts is None and self.input is None:
            raise ValueError("needs `prompts` (GenQA: generator prompts, with `n`) or `input` (a table of "
                             "prompts to respond to)")
        if self.prompts is not None and self.n is None:
            raise ValueError("`prompts` needs `n`: how many requests to make")
        if self.input is not None and self.n is not None:
            raise ValueError("`n` counts GenQA requests; with `input` every row of the table is a prompt "
                             "(leave n out)")
        return self


@dataclass(frozen=True)
class PlannedRequest:
    k: int
    prompt: prompt_library.GeneratorPrompt
    draw: prompt_library.Draw
    request: GenRequest
    sample: int = 0


@dataclass(frozen=True)
class RowRequest:
    """Sample `sample` of input row `row` (its position in the batch); `request` None when the row
    has no prompt (`problem` says why)."""

    row: int
    parent_id: str
    sample: int
    prompt: list[dict]
    request: Optional[GenRequest]
    problem: Optional[str] = None


def sample_seed(config: GenerateConfig, k: int, sample: int) -> int:
    """The sampling seed of sample s of GenQA request k: sample 0 keeps the seed it always had."""
    if sample == 0:
        return config.seed * SEED_STRIDE + k
    return stable_seed(config.seed, "genqa", k, sample)


def plan_requests(config: GenerateConfig, prompts: list[prompt_library.GeneratorPrompt], model: str,
                  start: int = 0, stop: int | None = None) -> list[PlannedRequest]:
    """Requests start..stop-1 (default: all n), each with its samples. Request k depends on k, never on n."""
    planned = []
    for k in range(start, config.n if stop is None else stop):
        prompt = prompts[k % len(prompts)]
        draw = prompt.draw(config.seed, k)
        messages = prompt.render(draw)
        for s in range(config.samples):
            seed_k = sample_seed(config, k, s)
            rid = request_id(messages, config.temperature, config.top_p, config.max_tokens, seed_k, model)
            planned.append(PlannedRequest(k, prompt, draw, GenRequest(
                id=rid, messages=messages, temperature=config.temperature, top_p=config.top_p,
                max_tokens=config.max_tokens, seed=seed_k), s))
    return planned


def plan_row_requests(config: GenerateConfig, batch, model: str) -> list[RowRequest]:
    """The requests of a batch of input rows, row by row, each row's samples in order."""
    if "id" not in batch.columns:
        raise DatamillError(f"generate input '{config.input}' has no `id` column: each row's samples are "
                            "seeded by its id (a source or a generate step gives one; in SQL, keep `id`)")
    if config.column not in batch.columns:
        raise DatamillError(f"generate input '{config.input}' has no column '{config.column}' (columns: "
                            f"{', '.join(batch.columns)}); set `column:` to the one holding the prompts")
    planned = []
    for row, (parent, value) in enumerate(zip(batch["id"].to_list(), batch[config.column].to_list())):
        prompt, _ = split_last_turn(value)
        problem = None
        if parent is None:
            problem = "the input row has no id"
        elif not prompt or not any((m.get("content") or "").strip() for m in prompt):
            problem = f"empty prompt: the row's '{config.column}' has nothing before its last assistant turn"
        for s in range(config.samples):
            seed = stable_seed(config.seed, parent, s)
            request = None if problem else GenRequest(
                id=request_id(prompt, config.temperature, config.top_p, config.max_tokens, seed, model),
                messages=prompt, temperature=config.temperature, top_p=config.top_p,
                max_tokens=config.max_tokens, seed=seed)
            planned.append(RowRequest(row, parent, s, prompt, request, problem))
    return planned


class GenerateStep(Step):
    """Generate instruction data with an LLM from generator prompts (GenQA), or respond to a table's prompts."""

    kind = "generate"
    execution_only = EXECUTION_ONLY
    Config = GenerateConfig
    version = "2"  # 2: the `sample` column; responding to an input table
    side_tables = ("rejected",)

    def input_tables(self):
        return [(("input",), self.config.input)] if self.config.input else []

    def model_refs(self):
        return [(("model",), self.config.model)] if is_local(self.config.backend) else []

    def check(self, env) -> None:
        for i, entry in enumerate(self.config.prompts or ()):
            try:
                prompt_library.load(entry, env.base_dir)
            except prompt_library.PromptError as e:
                raise FieldError(("prompts", i), str(e)) from None

    def key_config(self) -> dict:
        return backend_key_config(super().key_config(), self.config.backend)

    def key_material(self, env) -> dict:
        # The prompts' contents decide the output: editing a prompt file reruns the step.
        hashes = []
        for entry in self.config.prompts or ():
            try:
                hashes.append(prompt_library.load(entry, env.base_dir).hash)
            except prompt_library.PromptError:
                hashes.append(None)  # check() reports it
        return {"prompts": hashes} if self.config.prompts else {}

    # --- running ---------------------------------------------------------------------------

    def run(self, ctx) -> None:
        cfg = self.config
        total = (cfg.n if cfg.prompts else ctx.input_rows(cfg.input)) * cfg.samples
        tally = _Tally()
        # Window by window: plan, send what the cache lacks, then write the window's rows from the
        # cache in request order, so memory holds one window (and the index), never all results.
        with RequestCache(ctx, cfg, total) as cache, \
                ctx.writer() as out, ctx.writer("rejected") as out_rejected:
            window = max(1, cache.window(WINDOW) // cfg.samples)  # prompts (or rows) per window
            if cfg.prompts:
                prompts = [prompt_library.load(entry, ctx.env.base_dir) for entry in cfg.prompts]
                for first in range(0, cfg.n, window):
                    planned = plan_requests(cfg, prompts, cache.identity, first, min(cfg.n, first + window))
                    cache.send([p.request for p in planned])
                    self._write_tables(ctx, planned, cache.index, cache.fresh, out, out_rejected, tally)
            else:
                for batch in ctx.read_batches(cfg.input, rows=window):
                    planned = plan_row_requests(cfg, batch, cache.identity)
                    cache.send([p.request for p in planned if p.request is not None])
                    for i in range(0, len(planned), TABLE_BATCH):
                        chunk = planned[i:i + TABLE_BATCH]
                        rows, rejected = self._response_tables(
                            ctx, batch, chunk, cache.read([p.request.id for p in chunk if p.request is not None]))
                        out.write(rows)
                        out_rejected.write(rejected)
                        tally.add(rows, rejected)
        self._report(ctx, total, cache, tally)
        ctx.stats.update(ctx.shards.summary())
        self._check_failures(tally, total)

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
            raise failure_error(tally.failed, total, tally.first_failure)

    @staticmethod
    def _per_task(cfg: GenerateConfig, tasks_at_once: int) -> GenerateConfig:
        return per_task(cfg, tasks_at_once)

    def _failure(self, result: dict | None, text: str | None):
        """A ParseError for a request without a usable result, or None."""
        from datagen.parsing import ParseError

        if result is None:
            return ParseError("no result: the backend returned nothing for this request", "no_result")
        if text is None:
            return ParseError(f"request failed: {result.get('error') or 'unknown error'}", "request_failed")
        return None

    def _truncated(self, result: dict):
        from datagen.parsing import ParseError

        if result.get("finish_reason") == "length" and not self.config.keep_truncated:
            return ParseError(f"the output hit max_tokens={self.config.max_tokens} before it ended: the answer "
                              "may be cut off (keep_truncated: true keeps such rows)", "truncated")
        return None

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
                      "gen_subindex": p.draw.subindex, "gen_seed": p.request.seed, "request_id": p.request.id,
                      "sample": p.sample}
            text = None if result is None else result.get("text")
            try:
                failure = self._failure(result, text)
                if failure:
                    raise failure
                try:
                    messages = parse(p.prompt.parser, text)
                except ParseError as e:
                    if result.get("finish_reason") == "length":
                        e.reason += f" (the output hit max_tokens={cfg.max_tokens})"
                    raise
                failure = self._truncated(result)
                if failure:
                    raise failure
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

    def _response_tables(self, ctx, batch, planned: list[RowRequest], results: dict[str, dict]):
        """Input mode: the rows (prompt + reply, the input row's other columns carried over) and the
        rejected rows of these requests, in order."""
        import polars as pl

        from datagen.parsing import ParseError
        from datamill.records import CANONICAL_COLUMNS, MAX_RAW_CHARS, row_id

        cfg = self.config
        rows, positions, rejected = [], [], []
        for p in planned:
            result = None if p.request is None else results.get(p.request.id)
            text = None if result is None else result.get("text")
            common = {"request_id": None if p.request is None else p.request.id, "parent_id": p.parent_id,
                      "sample": p.sample, "gen_seed": None if p.request is None else p.request.seed}
            try:
                if p.request is None:
                    raise ParseError(p.problem, "empty_prompt" if p.parent_id is not None else "no_id")
                failure = self._failure(result, text)
                if failure:
                    raise failure
                reply = text.strip()
                if not reply:
                    raise ParseError("empty output", "empty")
                failure = self._truncated(result)
                if failure:
                    raise failure
            except ParseError as e:
                rejected.append({**common, "reason": e.reason, "reason_kind": e.kind, "raw": (text or "")[:MAX_RAW_CHARS],
                                 "finish_reason": None if result is None else result.get("finish_reason")})
                continue
            messages = p.prompt + [{"role": "assistant", "content": reply}]
            rows.append({**common, "id": row_id(messages), "messages": messages, "source": ctx.name,
                         "gen_prompt": None, "gen_model": cfg.model, "gen_finish_reason": result.get("finish_reason")})
            positions.append(p.row)
        own = response_schema()
        made = pl.DataFrame(rows, schema=own)
        carried = [c for c in batch.columns if c not in own]
        out = pl.concat([made.select(list(CANONICAL_COLUMNS)), batch.select(carried)[positions],
                         made.select(list(RESPONSE_COLUMNS))], how="horizontal")
        return out, pl.DataFrame(rejected, schema=response_rejected_schema())

    def _report(self, ctx, total: int, cache: RequestCache, tally: "_Tally") -> None:
        import polars as pl

        failed = tally.failed
        ctx.stats.update(cache.numbers(total, failed))
        ctx.stats.update({"parsed": tally.rows, "rejected": tally.rejected,
                          "parse_rate": round(tally.rows / max(total - failed, 1), 4)})
        ctx.stats["rejected_by_reason"] = dict(sorted(tally.by_reason.items()))
        if cache.stats.extra:
            ctx.stats["backend"] = cache.stats.extra
        # The stats are logged as metrics by the tracker (`<step>.sent`, `<step>.rejected_by_reason.<kind>`).
        rows, rejected = tally.rows_head, tally.rejected_head
        described = ("gen_prompt", "category", "gen_index", "gen_subindex", "gen_topic") if self.config.prompts \
            else ("parent_id",)
        if rows is not None and rows.height:
            ctx.log_sample(rows.select(
                pl.col("messages").list.first().struct.field("content").alias("user"),
                pl.col("messages").list.last().struct.field("content").alias("assistant"),
                *described, "sample", "gen_finish_reason", "request_id",
            ), rows=SAMPLE_ROWS)
        if rejected is not None and rejected.height:
            ctx.log_sample(rejected.select("reason_kind", "reason", "raw", described[0], "request_id"),
                           name="rejected_sample", rows=REJECTED_SAMPLE_ROWS)


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
            "gen_finish_reason": pl.String, "request_id": pl.String, "sample": pl.Int64}


def rejected_schema() -> dict:
    import polars as pl

    return {"request_id": pl.String, "gen_prompt": pl.String, "gen_prompt_hash": pl.String, "gen_index": pl.Int64,
            "gen_subindex": pl.Int64, "gen_seed": pl.Int64, "sample": pl.Int64, "reason": pl.String,
            "reason_kind": pl.String, "raw": pl.String, "finish_reason": pl.String}


def response_schema() -> dict:
    """The columns an input-mode row gets from the step (the input's other columns follow the canonical ones)."""
    import polars as pl

    from datamill.records import INSTRUCTION_SCHEMA

    return {**INSTRUCTION_SCHEMA, "sample": pl.Int64, "request_id": pl.String, "gen_finish_reason": pl.String}


def response_rejected_schema() -> dict:
    import polars as pl

    return {"request_id": pl.String, "parent_id": pl.String, "sample": pl.Int64, "gen_seed": pl.Int64,
            "reason": pl.String, "reason_kind": pl.String, "raw": pl.String, "finish_reason": pl.String}
