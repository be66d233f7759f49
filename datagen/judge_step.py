"""`judge`: an LLM scores a table's rows (pointwise) or compares two responses per row (pairwise).

The requests go through the generate step's backends and request cache (datagen/requests.py):
a judge's verdicts are resumed, retried and never sent twice, like generated text. The template
(datagen/judging.py; shipped: helpfulness, correctness, instruction_following, reference,
pairwise) renders each request and says how the verdict is read.

Pointwise: the row's conversation (`column`) up to its last assistant turn is the prompt, that
turn the response. Output: every input column + `judge_score`, `judge_reason`,
`judge_request_id`, `judge_model`.

Pairwise: the `pair` columns (message lists, whose last assistant turns are compared, or strings
with the prompt from `column`) are shown in both orders, A=a/B=b and A=b/B=a, so that a judge's
preference for a position cancels out. Output: every input column + `judge_score_a` (the share
of the two orders that favour column a, a tie counting half), `judge_preference` (a | b | tie),
`judge_margin` (|score_a - 0.5| * 2), `judge_agreement` (both orders agree),
`judge_request_ids`, `judge_model`. Stats: `position_consistency` (mean agreement) and
`first_position_rate` (the share of decisive verdicts that chose whichever response was shown
first: 1.0 for a judge that always answers A, about 0.5 for an unbiased one). A judge that always
answers A gives every pair score_a 0.5: a tie, not a preference.

Rows keep their `id` (a judged sample is the sample's row). Verdicts that cannot be read, scores
outside the scale and failed requests go to `<step>__rejected` with the reason and the raw text.

Calibration: when the input has the `reference` column (default `answer`) and a `family` column
(the offline task families), each row's truth is `datagen.verify.is_correct` (family "chat" has
no answer: skipped). Pointwise, the judge says "correct" when its score is at least
`calibration_threshold` (default: the scale's midpoint); pairwise, on pairs where exactly one side
is correct, it is right when it prefers that side. Reported per family and overall in
`<step>__calibration` and the stats: accuracy with a bootstrap 95% interval, the chance baseline
(always answering the majority class) and whether the interval's lower end is above it. A judge
no better than chance gets a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Literal, Optional

from pydantic import Field

from datagen import judging
from datagen.backends.base import GenRequest
from datagen.backends import is_local
from datagen.requests import (EXECUTION_ONLY, BackendConfig, RequestCache, backend_key_config, failure_error,
                              request_id, split_last_turn)
from datamill.errors import DatamillError, FieldError
from datamill.step import Step

WINDOW = 65_536  # requests planned, sent and written at a time (times the executor's workers)
TABLE_BATCH = 8_192  # rows judged (results read back from the cache) at a time
SAMPLE_ROWS = 50
MAX_EXACT_CI = 20_000  # above this many rows the accuracy interval is the normal one (the bootstrap's, at that n)
CHOICE_FAVOURS_A = ({"A": 1.0, "B": 0.0, "tie": 0.5}, {"A": 0.0, "B": 1.0, "tie": 0.5})  # order 1 (a first), order 2


class JudgeConfig(BackendConfig):
    """Score rows (pointwise) or compare two responses per row (pairwise) with an LLM judge."""

    input: str
    """Table to judge."""
    mode: Literal["pointwise", "pairwise"] = "pointwise"
    """pointwise: each row's response gets a score; pairwise: the two `pair` responses are compared,
    in both orders."""
    template: Optional[str] = None
    """Judge template: a shipped name (helpfulness, correctness, instruction_following, reference,
    pairwise: datagen/judge_templates/) or the path of your own YAML file, relative to the spec.
    Default: helpfulness (pointwise), pairwise (pairwise)."""
    column: str = "messages"
    """The conversation column: pointwise, the prompt is everything before its last assistant turn
    and the response that turn; pairwise, the prompt when the `pair` columns are strings."""
    pair: list[str] = Field(default_factory=lambda: ["chosen", "rejected"], min_length=2, max_length=2)
    """pairwise: the two columns compared, [a, b]: message lists (their last assistant turns are
    compared, the prompt is a's conversation before it) or strings."""
    reference: str = "answer"
    """Column with the reference answer: shown to templates that use {reference}, and, with a
    `family` column, the truth the judge is calibrated against."""
    calibration_threshold: Optional[float] = None
    """pointwise calibration: a score at least this says "correct" (default: the scale's midpoint)."""
    seed: int = 0
    """Sampling seed of every request (matters only with temperature > 0)."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature (0: greedy, the usual for a judge)."""
    max_tokens: int = Field(256, ge=1)
    """Most tokens of a verdict, reasons included."""


@dataclass
class _Job:
    """One row's requests (1 pointwise, 2 pairwise: a first, then b first), or why it has none."""

    row: int
    requests: list[GenRequest]
    responses: tuple = ()  # the judged response(s): (response,) or (a, b)
    problem: Optional[tuple[str, str]] = None  # (reason, kind)


@dataclass
class _Tally:
    rows: int = 0
    rejected: int = 0
    by_reason: dict = dc_field(default_factory=dict)
    failed: int = 0
    first_failure: Optional[str] = None
    score_sum: float = 0.0
    agreements: int = 0
    decisive: int = 0  # pairwise verdicts that chose a side
    first_chosen: int = 0  # ... the side shown first
    preferences: dict = dc_field(default_factory=lambda: {"a": 0, "b": 0, "tie": 0})
    calibration: list = dc_field(default_factory=list)  # (family, truth, hit) per row with a checkable answer

    def reject(self, kind: str, reason: str) -> None:
        self.rejected += 1
        self.by_reason[kind] = self.by_reason.get(kind, 0) + 1
        if kind in ("request_failed", "no_result"):
            self.failed += 1
            self.first_failure = self.first_failure or reason


class JudgeStep(Step):
    """Score or compare rows with an LLM judge, through the generate backends and request cache."""

    kind = "judge"
    Config = JudgeConfig
    execution_only = EXECUTION_ONLY
    version = "1"
    side_tables = ("rejected", "calibration")

    @property
    def template_entry(self) -> str:
        return self.config.template or judging.DEFAULT_TEMPLATE[self.config.mode]

    def input_tables(self):
        return [(("input",), self.config.input)]

    def model_refs(self):
        return [(("model",), self.config.model)] if is_local(self.config.backend) else []

    def check(self, env) -> None:
        try:
            template = judging.load(self.template_entry, env.base_dir)
        except judging.TemplateError as e:
            raise FieldError("template", str(e)) from None
        if template.mode != self.config.mode:
            raise FieldError("template", f"template '{template.name}' is {template.mode} but this step's mode is "
                                         f"{self.config.mode} (set `mode: {template.mode}` or pick a "
                                         f"{self.config.mode} template)")

    def key_config(self) -> dict:
        return backend_key_config(super().key_config(), self.config.backend)

    def key_material(self, env) -> dict:
        # The template's content decides the requests: editing it reruns the step.
        try:
            return {"template": judging.load(self.template_entry, env.base_dir).hash}
        except judging.TemplateError:
            return {"template": None}  # check() reports it

    # --- running ---------------------------------------------------------------------------

    def run(self, ctx) -> None:
        cfg = self.config
        template = judging.load(self.template_entry, ctx.env.base_dir)
        per_row = 1 if cfg.mode == "pointwise" else 2
        rows_in = ctx.input_rows(cfg.input)
        total = rows_in * per_row
        tally = _Tally()
        with RequestCache(ctx, cfg, total) as cache, ctx.writer() as out, ctx.writer("rejected") as out_rejected:
            for batch in ctx.read_batches(cfg.input, rows=max(1, cache.window(WINDOW) // per_row)):
                self._check_columns(batch, template)
                jobs = [job for i in range(0, batch.height, TABLE_BATCH)
                        for job in self._plan(batch.slice(i, TABLE_BATCH), template, cache.identity, offset=i)]
                cache.send([r for job in jobs for r in job.requests])
                for i in range(0, batch.height, TABLE_BATCH):
                    chunk = [job for job in jobs if i <= job.row < i + TABLE_BATCH]
                    results = cache.read([r.id for job in chunk for r in job.requests])
                    rows, rejected = self._tables(batch, chunk, results, template, tally)
                    out.write(rows)
                    out_rejected.write(rejected)
        calibration = self._calibration(ctx, template, tally)
        self._report(ctx, rows_in, total, cache, tally, calibration)
        ctx.stats.update(ctx.shards.summary())
        if tally.failed and tally.failed > cfg.max_failed_fraction * total:
            raise failure_error(tally.failed, total, tally.first_failure)

    def _check_columns(self, batch, template) -> None:
        cfg = self.config
        needed = [cfg.column] if cfg.mode == "pointwise" else list(cfg.pair)
        if template.uses_reference:
            needed.append(cfg.reference)
        missing = [c for c in needed if c not in batch.columns]
        if missing:
            raise DatamillError(f"judge input '{cfg.input}' has no column {', '.join(repr(c) for c in missing)} "
                                f"(columns: {', '.join(batch.columns)}); set `column:`, `pair:` or `reference:`")

    def _request(self, messages: list[dict], model: str) -> GenRequest:
        cfg = self.config
        return GenRequest(id=request_id(messages, cfg.temperature, 1.0, cfg.max_tokens, cfg.seed, model),
                          messages=messages, temperature=cfg.temperature, top_p=1.0, max_tokens=cfg.max_tokens,
                          seed=cfg.seed)

    def _plan(self, batch, template: judging.JudgeTemplate, model: str, offset: int = 0) -> list[_Job]:
        """The requests of each row of a batch (rows numbered from `offset`)."""
        cfg = self.config
        references = batch[cfg.reference].to_list() if cfg.reference in batch.columns else [None] * batch.height
        jobs = []
        if cfg.mode == "pointwise":
            for i, (value, reference) in enumerate(zip(batch[cfg.column].to_list(), references)):
                prompt, response = ([], value) if isinstance(value, str) else split_last_turn(value)
                problem = _missing(response, reference if template.uses_reference else "", "response")
                requests = [] if problem else [self._request(template.render(
                    prompt=judging.conversation_text(prompt), response=response, reference=reference), model)]
                jobs.append(_Job(offset + i, requests, (response,), problem))
            return jobs
        a, b = cfg.pair
        prompts = batch[cfg.column].to_list() if cfg.column in batch.columns else [None] * batch.height
        for i, (va, vb, conversation, reference) in enumerate(zip(batch[a].to_list(), batch[b].to_list(), prompts,
                                                                  references)):
            prompt, ra = ([], va) if isinstance(va, str) or va is None else split_last_turn(va)
            rb = vb if isinstance(vb, str) or vb is None else split_last_turn(vb)[1]
            if isinstance(va, str) or va is None:
                prompt = split_last_turn(conversation)[0]
            problem = _missing(ra, reference if template.uses_reference else "", f"'{a}' response") or \
                _missing(rb, "", f"'{b}' response")
            text = judging.conversation_text(prompt)
            requests = [] if problem else [
                self._request(template.render(prompt=text, response_a=first, response_b=second, reference=reference),
                              model) for first, second in ((ra, rb), (rb, ra))]
            jobs.append(_Job(offset + i, requests, (ra, rb), problem))
        return jobs

    def _tables(self, batch, jobs: list[_Job], results: dict, template, tally: _Tally):
        import polars as pl

        from datamill.records import MAX_RAW_CHARS

        cfg = self.config
        ids = batch["id"].cast(pl.String).to_list() if "id" in batch.columns else [None] * batch.height
        truth = _truth_columns(batch, cfg.reference)
        kept, new, rejected = [], [], []
        for job in jobs:
            verdicts, failure = [], job.problem
            for request in job.requests:
                result = results.get(request.id)
                text = None if result is None else result.get("text")
                if result is None:
                    failure = ("no result: the backend returned nothing for this request", "no_result")
                elif text is None:
                    failure = (f"request failed: {result.get('error') or 'unknown error'}", "request_failed")
                else:
                    try:
                        verdicts.append(template.score(text) if cfg.mode == "pointwise" else template.choice(text))
                        continue
                    except judging.VerdictError as e:
                        failure = (e.reason, e.kind)
                rejected.append({"id": ids[job.row], "judge_request_id": request.id, "reason": failure[0],
                                 "reason_kind": failure[1], "raw": (text or "")[:MAX_RAW_CHARS]})
                tally.reject(failure[1], failure[0])
                break
            else:
                if failure:  # no request at all: nothing to judge
                    rejected.append({"id": ids[job.row], "judge_request_id": None, "reason": failure[0],
                                     "reason_kind": failure[1], "raw": ""})
                    tally.reject(failure[1], failure[0])
                    continue
                kept.append(job.row)
                new.append(self._judged(job, verdicts, tally, truth, template))
        rows = pl.concat([batch[kept], pl.DataFrame(new, schema=self._schema())], how="horizontal")
        tally.rows += rows.height
        return rows, pl.DataFrame(rejected, schema=rejected_schema())

    def _judged(self, job: _Job, verdicts: list, tally: _Tally, truth, template) -> dict:
        """One judged row's new columns; the tally's stats and calibration pairs."""
        from datagen.verify import is_correct

        cfg = self.config
        ids = [r.id for r in job.requests]
        known = truth(job.row)  # (answer, family) when the row's answer is checkable
        if cfg.mode == "pointwise":
            score, reason = verdicts[0]
            tally.score_sum += score
            if known:
                threshold = template.midpoint if cfg.calibration_threshold is None else cfg.calibration_threshold
                correct = is_correct(job.responses[0] or "", *known)
                tally.calibration.append((known[1], correct, (score >= threshold) == correct))
            return {"judge_score": score, "judge_reason": reason, "judge_request_id": ids[0], "judge_model": cfg.model}
        (first, _), (second, _) = verdicts
        favour = [CHOICE_FAVOURS_A[0][first], CHOICE_FAVOURS_A[1][second]]
        score_a = sum(favour) / 2
        preference = "a" if score_a > 0.5 else "b" if score_a < 0.5 else "tie"
        tally.agreements += favour[0] == favour[1]
        for choice in (first, second):
            if choice != "tie":
                tally.decisive += 1
                tally.first_chosen += choice == "A"
        tally.preferences[preference] += 1
        if known:
            a_correct, b_correct = (is_correct(r or "", *known) for r in job.responses)
            if a_correct != b_correct:
                tally.calibration.append((known[1], a_correct, preference == ("a" if a_correct else "b")))
        return {"judge_score_a": score_a, "judge_preference": preference, "judge_margin": abs(score_a - 0.5) * 2,
                "judge_agreement": favour[0] == favour[1], "judge_request_ids": ids, "judge_model": cfg.model}

    def _schema(self) -> dict:
        import polars as pl

        if self.config.mode == "pointwise":
            return {"judge_score": pl.Float64, "judge_reason": pl.String, "judge_request_id": pl.String,
                    "judge_model": pl.String}
        return {"judge_score_a": pl.Float64, "judge_preference": pl.String, "judge_margin": pl.Float64,
                "judge_agreement": pl.Boolean, "judge_request_ids": pl.List(pl.String), "judge_model": pl.String}

    # --- calibration and report --------------------------------------------------------------

    def _calibration(self, ctx, template, tally: _Tally) -> dict | None:
        """Accuracy against the known answers, per family and overall: a side table, and the overall
        numbers (None when no row had a checkable answer)."""
        import numpy as np
        import polars as pl

        families = sorted({f for f, _, _ in tally.calibration})
        rows = []
        for scope in (["all"] + families) if tally.calibration else []:
            picked = [(t, h) for f, t, h in tally.calibration if scope == "all" or f == scope]
            truth = np.array([t for t, _ in picked], dtype=float)
            hits = np.array([h for _, h in picked], dtype=float)
            accuracy = float(hits.mean())
            low, high = accuracy_interval(hits)
            chance = float(max(truth.mean(), 1 - truth.mean()))  # always answering the majority class
            rows.append({"scope": scope, "n": len(picked), "accuracy": round(accuracy, 4), "ci_low": round(low, 4),
                         "ci_high": round(high, 4), "chance": round(chance, 4), "beats_chance": low > chance,
                         "truth_rate": round(float(truth.mean()), 4)})
        ctx.write(pl.DataFrame(rows, schema=calibration_schema()), "calibration")
        if not rows:
            return None
        overall = rows[0]
        if not overall["beats_chance"]:
            measure = "accuracy" if self.config.mode == "pointwise" else "share preferring the correct response"
            one_class = " (the rows are all of one class: no judge can beat that baseline here)" \
                if overall["chance"] >= 1 else ""
            message = (f"judge '{ctx.name}' ({template.name}, {self.config.model}) is no better than chance: its "
                       f"{measure} on {overall['n']} rows with known answers is {overall['accuracy']:.3f} (95% CI "
                       f"{overall['ci_low']:.3f}-{overall['ci_high']:.3f}), the majority-class baseline "
                       f"{overall['chance']:.3f}{one_class}; its verdicts carry no evidence on these rows")
            ctx.stats["warning"] = message  # printed under the step's summary line, and logged
        return {k: v for k, v in overall.items() if k != "scope"}

    def _report(self, ctx, rows_in: int, total: int, cache: RequestCache, tally: _Tally, calibration) -> None:
        ctx.stats.update(cache.numbers(total, tally.failed))
        ctx.stats.update({"rows_in": rows_in, "judged": tally.rows, "rejected": tally.rejected,
                          "rejected_by_reason": dict(sorted(tally.by_reason.items()))})
        if tally.rows and self.config.mode == "pointwise":
            ctx.stats["score_mean"] = round(tally.score_sum / tally.rows, 4)
        if tally.rows and self.config.mode == "pairwise":
            ctx.stats["position_consistency"] = round(tally.agreements / tally.rows, 4)
            ctx.stats["preference"] = {k: round(v / tally.rows, 4) for k, v in tally.preferences.items()}
            if tally.decisive:
                ctx.stats["first_position_rate"] = round(tally.first_chosen / tally.decisive, 4)
        if calibration is not None:
            ctx.stats["calibration"] = calibration
        if cache.stats.extra:
            ctx.stats["backend"] = cache.stats.extra


def _missing(response, reference, what: str) -> tuple[str, str] | None:
    """Why a row cannot be judged (no response, no reference answer), or None."""
    if response is None or not str(response).strip():
        return f"no {what} to judge", "no_response"
    if reference is None:
        return "no reference answer (the template shows one)", "no_reference"
    return None


def _truth_columns(batch, reference: str):
    """row -> (answer, family) when the row's answer can be checked, else None."""
    from datagen.verify import FAMILIES_WITHOUT_ANSWER

    if reference not in batch.columns or "family" not in batch.columns:
        return lambda row: None
    answers, families = batch[reference].to_list(), batch["family"].to_list()

    def known(row: int):
        answer, family = answers[row], families[row]
        if answer is None or family is None or family in FAMILIES_WITHOUT_ANSWER:
            return None
        return str(answer), family

    return known


def accuracy_interval(hits) -> tuple[float, float]:
    """95% interval of a share: the bootstrap's (datamill.stats) up to MAX_EXACT_CI values, the
    normal one beyond (where the two agree and the bootstrap's resamples would be costly)."""
    import numpy as np

    from datamill import stats

    hits = np.asarray(hits, dtype=float)
    if hits.size <= MAX_EXACT_CI:
        return stats.interval(hits)
    p = float(hits.mean())
    half = 1.959964 * (p * (1 - p) / hits.size) ** 0.5
    return max(0.0, p - half), min(1.0, p + half)


def rejected_schema() -> dict:
    import polars as pl

    return {"id": pl.String, "judge_request_id": pl.String, "reason": pl.String, "reason_kind": pl.String,
            "raw": pl.String}


def calibration_schema() -> dict:
    import polars as pl

    return {"scope": pl.String, "n": pl.Int64, "accuracy": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
            "chance": pl.Float64, "beats_chance": pl.Boolean, "truth_rate": pl.Float64}
