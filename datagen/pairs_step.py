"""`pairs`: preference pairs (prompt / chosen / rejected) from sampled responses, for DPO.

    steps:
      samples: {generate: {model: smol, input: tasks, samples: 4, temperature: 1.0}}
      prefs:   {pairs: {input: samples, by: verified}}              # correct vs incorrect answers
      scored:  {judge: {input: samples, ...}}
      prefs2:  {pairs: {input: scored, by: judge, margin: 2}}        # higher vs lower judge score
      prefs3:  {pairs: {by: models, chosen_input: strong, rejected_input: weak, require_correct: true}}

Why a step and not a `select` method: a select method scores rows and keeps a subset of the same
shape (one response per row). Pairs change the shape: the several sampled responses of one prompt
become prompt/chosen/rejected rows, so they need their own output schema, grouping and reasons.

Input rows are sampled responses, one per row: `messages` = the prompt turns + one assistant turn,
and a `group` column (default `parent_id`, the id of the prompt row they answer, as `generate` with
`input:` and `samples: k` writes it). Responses of one group are paired by:

    verified  a response that `datagen.verify.is_correct` finds correct (the exact-match eval's rule,
              from each row's `answer` and `family`) vs one it finds incorrect
    judge     a higher `score` (`judge_score`, written by a judge step) vs a lower one: the difference
              must be > 0 and >= `margin`
    models    a row of `chosen_input` vs a row of `rejected_input` with the same group value (a
              stronger and a weaker model's answers to the same prompts); `require_correct: true`
              keeps only pairs whose chosen is verified correct and whose rejected is not

Pairing within a group: candidates are ordered best first (verified and models: a seeded shuffle of
each side, the seed and the group value deciding it; judge: by score, ties in a seeded order); each
candidate in turn is paired with the worst remaining one on the other side that qualifies, and no
response is used twice, up to `per_prompt` pairs. Two responses with the same text never form a
pair, and a pair already made (same prompt, chosen and rejected text, from any group) is not made
again.

Output: the canonical preference rows of `datamill/records.py` (id, prompt, chosen, rejected,
source, provenance: gen_prompt, gen_model and gen_seed of the chosen response, parent_id = the
group value), then chosen_id / rejected_id (the responses' row ids: lineage follows them),
chosen_request_id / rejected_request_id (when the input has `request_id`), chosen_score /
rejected_score / margin (verified and require_correct: 1.0 / 0.0; judge: the scores), pair_source,
and the prompt row's other columns as the chosen response carries them (answer, family, ...).
`<step>__skipped` lists every group that gave no pair, with the reason.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal, Optional

from pydantic import Field, model_validator

from datamill.errors import DatamillError
from datamill.step import Step, StepConfig

# Columns that describe one response, not the prompt it answers: not carried over as the group's
# columns (nor are columns starting with RESPONSE_PREFIXES, nor the score and group columns).
RESPONSE_COLUMNS = ("id", "messages", "source", "parent_id", "sample", "request_id")
RESPONSE_PREFIXES = ("gen_", "judge_")
# Why a group may give no pair; the furthest a candidate pair got decides the reason (`_match`).
REFUSALS = ("different prompts", "margin too small", "identical responses", "duplicate pairs")


class PairsConfig(StepConfig):
    """Build preference pairs (prompt/chosen/rejected) from sampled responses: by verified answers,
    by judge scores, or from a stronger and a weaker model's answers."""

    by: Literal["verified", "judge", "models"]
    """How chosen and rejected are told apart: `verified` (a correct vs an incorrect answer, by the
    exact-match eval's rule), `judge` (a higher vs a lower judge score), `models` (a row of
    `chosen_input` vs a row of `rejected_input` answering the same prompt)."""
    input: Optional[str] = None
    """Table of sampled responses (by: verified | judge): one response per row, `messages` = the
    prompt turns + one assistant turn, as `generate` with `input:` and `samples:` writes them."""
    chosen_input: Optional[str] = None
    """by: models: the table of preferred responses (e.g. a stronger model's answers)."""
    rejected_input: Optional[str] = None
    """by: models: the table of dispreferred responses to the same prompts (e.g. a weaker model's)."""
    group: str = "parent_id"
    """Column tying a response to its prompt: responses with the same value are compared."""
    score: str = "judge_score"
    """by: judge: the column holding each response's score (higher is better)."""
    answer: str = "answer"
    """by: verified (and require_correct): the column holding the correct answer."""
    family: str = "family"
    """by: verified (and require_correct): the column naming the task family, which decides how the
    answer is read from a response (`datagen/verify.py`); `chat` has no checkable answer."""
    margin: float = Field(0.0, ge=0)
    """by: judge: the smallest score difference a pair may have; 0 means any strictly higher score."""
    per_prompt: int = Field(1, ge=1)
    """Most pairs per prompt (group); a response is used in at most one of them."""
    require_correct: bool = False
    """by: models: keep only pairs whose chosen response is verified correct and whose rejected one
    is not (reads `answer` and `family`)."""
    seed: int = 0
    """Seed of the order in which equally good candidates are paired."""

    @model_validator(mode="after")
    def _inputs_match_by(self):
        if self.by == "models":
            if self.input is not None:
                raise ValueError("by: models reads `chosen_input` and `rejected_input`, not `input`")
            if self.chosen_input is None or self.rejected_input is None:
                raise ValueError("by: models needs `chosen_input` and `rejected_input` (two tables of "
                                 "responses to the same prompts)")
        else:
            if self.input is None:
                raise ValueError(f"by: {self.by} needs `input`: a table of sampled responses")
            given = [f for f in ("chosen_input", "rejected_input") if getattr(self, f) is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} only apply to by: models")
            if self.require_correct:
                raise ValueError("require_correct applies to by: models (by: verified always pairs a "
                                 "correct with an incorrect response)")
        if "margin" in self.model_fields_set and self.by != "judge":
            raise ValueError("margin applies to by: judge (a difference of judge scores)")
        return self


@dataclass
class Response:
    """One sampled response, as pairing needs it."""

    row: int  # position in its table
    group: object
    prompt: list[dict]
    text: str
    id: Optional[str] = None
    request_id: Optional[str] = None
    score: Optional[float] = None
    correct: Optional[bool] = None  # None: no checkable answer
    no_answer: Optional[str] = None  # why there is no checkable answer
    provenance: dict = field(default_factory=dict)


@dataclass
class Pair:
    chosen: Response
    rejected: Response
    id: str


class PairsStep(Step):
    """Pair sampled responses of the same prompt into prompt/chosen/rejected rows."""

    kind = "pairs"
    Config = PairsConfig
    side_tables = ("skipped",)
    row_reference_columns = ("chosen_id", "rejected_id")

    def input_tables(self):
        cfg = self.config
        if cfg.by == "models":
            return [(("chosen_input",), cfg.chosen_input), (("rejected_input",), cfg.rejected_input)]
        return [(("input",), cfg.input)]

    # --- run ---
    def run(self, ctx) -> None:
        cfg = self.config
        if cfg.by == "models":
            chosen_frame, rejected_frame = ctx.read(cfg.chosen_input), ctx.read(cfg.rejected_input)
            chosen_side = self._responses(ctx.name, cfg.chosen_input, chosen_frame, cfg.require_correct)
            rejected_side = self._responses(ctx.name, cfg.rejected_input, rejected_frame, cfg.require_correct)
            frame, groups = chosen_frame, _groups(chosen_side)
            rejected_groups = _groups(rejected_side)
            for value in rejected_groups:
                groups.setdefault(value, [])
            responses = chosen_side + rejected_side
            request_ids = "request_id" in chosen_frame.columns or "request_id" in rejected_frame.columns
        else:
            frame = ctx.read(cfg.input)
            responses = self._responses(ctx.name, cfg.input, frame, cfg.by == "verified")
            groups, rejected_groups = _groups(responses), {}
            request_ids = "request_id" in frame.columns

        # A blank reply is no completion to prefer or reject: counted, never paired.
        empty = sum(1 for r in responses if not r.text.strip())
        if empty:
            groups = {value: [r for r in members if r.text.strip()] for value, members in groups.items()}
            rejected_groups = {value: [r for r in members if r.text.strip()]
                               for value, members in rejected_groups.items()}
        pairs, skipped, seen, duplicates = [], [], set(), set()
        for value, members in groups.items():
            if cfg.by == "models":
                made, reason = self._models_pairs(value, members, rejected_groups.get(value, []), seen, duplicates)
            else:
                made, reason = self._group_pairs(value, members, seen, duplicates)
            pairs.extend(made)
            if not made:
                either = members or rejected_groups.get(value, [])
                skipped.append({"group": value, "prompt": either[0].prompt if either else None,
                                "responses": len(members) + len(rejected_groups.get(value, [])),
                                "reason": reason, "reason_kind": reason_kind(reason)})

        table = self._pairs_frame(ctx.name, pairs, frame, request_ids)
        ctx.write(table)
        ctx.log_sample(table.select("parent_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score"),
                       name="pairs", rows=20)
        ctx.write(self._skipped_frame(skipped, frame), "skipped")
        by_reason: dict[str, int] = {}
        for row in skipped:
            by_reason[row["reason_kind"]] = by_reason.get(row["reason_kind"], 0) + 1
        ctx.stats.update({"by": cfg.by, "responses": len(responses), "groups": len(groups), "pairs": len(pairs),
                          "groups_paired": len({p.chosen.group for p in pairs}), "skipped": len(skipped),
                          "skipped_by_reason": dict(sorted(by_reason.items())), "duplicates": len(duplicates),
                          "empty_responses": empty})

    # --- reading responses ---
    def _responses(self, step: str, table: str, frame, verify: bool) -> list[Response]:
        """The rows of `frame` as responses; DatamillError for a column the pairing needs."""
        import polars as pl

        cfg = self.config
        needed = {"messages": "the sampled responses themselves (prompt turns + one assistant turn), "
                              "as `generate` with `input:` writes them",
                  cfg.group: "the prompt each response answers: `generate` with `input:` and `samples:` "
                             "writes `parent_id` (set `group:` to another column)"}
        if cfg.by == "judge":
            needed[cfg.score] = ("each response's score: a `judge` step writes `judge_score` (pair its output "
                                 "table, or set `score:` to the column holding your scores)")
        if verify:
            for name in (cfg.answer, cfg.family):
                needed[name] = ("the prompt row's answer and family: a `tasks` table has them and `generate` "
                                f"carries them over to its responses (set `{'answer' if name == cfg.answer else 'family'}:` "
                                "to another column)")
        for name, why in needed.items():
            if name not in frame.columns:
                raise DatamillError(f"pairs step '{step}' (by: {cfg.by}): table '{table}' has no column '{name}', "
                                    f"which holds {why}; its columns: {', '.join(frame.columns)}")
        if cfg.by == "judge" and not frame.schema[cfg.score].is_numeric():
            raise DatamillError(f"pairs step '{step}': column '{cfg.score}' of '{table}' holds "
                                f"{frame.schema[cfg.score]}, not numbers: by: judge needs a numeric score")

        def column(name):
            return frame[name].to_list() if name in frame.columns else [None] * frame.height

        messages, groups = column("messages"), column(cfg.group)
        ids, request_ids = column("id"), column("request_id")
        scores = frame[cfg.score].cast(pl.Float64).to_list() if cfg.by == "judge" else [None] * frame.height
        answers, families = column(cfg.answer), column(cfg.family)
        provenance = {name: column(name) for name in ("gen_prompt", "gen_model", "gen_seed")}
        responses = []
        for i in range(frame.height):
            prompt, text = _split(messages[i], step, table, i)
            response = Response(row=i, group=groups[i], prompt=prompt, text=text,
                                id=None if ids[i] is None else str(ids[i]),
                                request_id=request_ids[i], score=_finite(scores[i]),
                                provenance={name: values[i] for name, values in provenance.items()})
            if verify:
                response.correct, response.no_answer = _verify(text, answers[i], families[i], cfg)
            responses.append(response)
        return responses

    # --- pairing ---
    def _group_pairs(self, value, members: list[Response], seen: set, duplicates: set):
        """by: verified | judge: (pairs, reason when there are none) of one group."""
        cfg = self.config
        if value is None:
            return [], f"no group: {len(members)} responses have a null '{cfg.group}'"
        if len(members) < 2:
            return [], f"fewer than 2 responses ({len(members)})"
        rng = random.Random(f"{cfg.seed}:{value}")
        if cfg.by == "verified":
            checkable = [r for r in members if r.correct is not None]
            if not checkable:
                return [], members[0].no_answer
            if len(checkable) < 2:
                return [], f"fewer than 2 responses with a checkable answer ({len(checkable)})"
            correct = [r for r in checkable if r.correct]
            incorrect = [r for r in checkable if not r.correct]
            if not incorrect:
                return [], f"all correct ({len(correct)} responses)"
            if not correct:
                return [], f"all incorrect ({len(incorrect)} responses)"
            rng.shuffle(correct)
            rng.shuffle(incorrect)
            return self._match(correct, incorrect, seen, duplicates, lambda c, r: True, members)
        scored = [r for r in members if r.score is not None]
        if len(scored) < 2:
            return [], f"fewer than 2 responses with a score ({len(scored)} of {len(members)})"
        tiebreak = {id(r): rng.random() for r in scored}
        best_first = sorted(scored, key=lambda r: (-r.score, tiebreak[id(r)]))
        return self._match(best_first, best_first[::-1], seen, duplicates, self._wide_enough, scored)

    def _models_pairs(self, value, chosen: list[Response], rejected: list[Response], seen: set, duplicates: set):
        """by: models: (pairs, reason when there are none) of one group."""
        cfg = self.config
        if value is None:
            return [], f"no group: responses with a null '{cfg.group}'"
        if not chosen:
            return [], f"no chosen response: the group is only in rejected_input '{cfg.rejected_input}'"
        if not rejected:
            return [], f"no rejected response: the group is only in chosen_input '{cfg.chosen_input}'"
        if cfg.require_correct:
            if all(r.correct is None for r in chosen):
                return [], chosen[0].no_answer
            chosen = [r for r in chosen if r.correct]
            rejected = [r for r in rejected if r.correct is False]
            if not chosen:
                return [], "no correct chosen response (require_correct)"
            if not rejected:
                return [], "no incorrect rejected response (require_correct)"
        rng = random.Random(f"{cfg.seed}:{value}")
        chosen, rejected = list(chosen), list(rejected)
        rng.shuffle(chosen)
        rng.shuffle(rejected)
        return self._match(chosen, rejected, seen, duplicates, lambda c, r: True, chosen + rejected)

    def _wide_enough(self, chosen: Response, rejected: Response) -> bool:
        difference = chosen.score - rejected.score
        return difference > 0 and difference >= self.config.margin

    def _match(self, best_first, worst_first, seen: set, duplicates: set, qualifies, members):
        """Each candidate of `best_first` in turn with the first unused one of `worst_first` that
        makes a new pair, up to `per_prompt` pairs: (pairs, reason when there are none)."""
        from datamill.records import preference_id

        pairs, used, furthest = [], set(), -1
        for chosen in best_first:
            if len(pairs) == self.config.per_prompt:
                break
            if id(chosen) in used:
                continue
            for rejected in worst_first:
                if id(rejected) in used or rejected is chosen:
                    continue
                if chosen.prompt != rejected.prompt:
                    furthest = max(furthest, 0)
                    continue
                if not qualifies(chosen, rejected):
                    furthest = max(furthest, 1)
                    continue
                if chosen.text == rejected.text:
                    furthest = max(furthest, 2)
                    continue
                pair_id = preference_id(chosen.prompt, _turn(chosen.text), _turn(rejected.text))
                if pair_id in seen:
                    furthest = max(furthest, 3)
                    duplicates.add(pair_id)
                    continue
                seen.add(pair_id)
                used.update((id(chosen), id(rejected)))
                pairs.append(Pair(chosen, rejected, pair_id))
                break
        return pairs, (None if pairs else self._refusal(REFUSALS[max(furthest, 0)], members))

    def _refusal(self, kind: str, members: list[Response]) -> str:
        if kind == "margin too small":
            scores = [r.score for r in members]
            best, worst = max(scores), min(scores)
            if best == worst:
                return f"margin too small: all {len(scores)} responses scored {best:g}"
            need = "> 0" if self.config.margin == 0 else f">= {self.config.margin:g}"
            return f"margin too small: best {best:g} - worst {worst:g} = {best - worst:g}, need {need}"
        if kind == "identical responses":
            return "identical responses: the responses that could pair have the same text"
        if kind == "duplicate pairs":
            return "duplicate pairs: every pair this group could give is already in the table"
        return "different prompts: the responses of this group answer different prompts"

    # --- tables ---
    def _pairs_frame(self, step: str, pairs: list[Pair], frame, request_ids: bool):
        import polars as pl

        from datamill.records import PREFERENCE_SCHEMA

        cfg = self.config
        schema = {**PREFERENCE_SCHEMA, "chosen_id": pl.String, "rejected_id": pl.String}
        if request_ids:
            schema.update({"chosen_request_id": pl.String, "rejected_request_id": pl.String})
        schema.update({"chosen_score": pl.Float64, "rejected_score": pl.Float64, "margin": pl.Float64,
                       "pair_source": pl.String})
        rows = []
        for pair in pairs:
            chosen, rejected = pair.chosen, pair.rejected
            scores = self._scores(chosen, rejected)
            row = {"id": pair.id, "prompt": chosen.prompt, "chosen": _turn(chosen.text),
                   "rejected": _turn(rejected.text), "source": step,
                   "gen_prompt": _text(chosen.provenance["gen_prompt"]),
                   "gen_model": _text(chosen.provenance["gen_model"]),
                   "gen_seed": chosen.provenance["gen_seed"], "parent_id": str(chosen.group),
                   "chosen_id": chosen.id, "rejected_id": rejected.id,
                   "chosen_request_id": chosen.request_id, "rejected_request_id": rejected.request_id,
                   "chosen_score": scores[0], "rejected_score": scores[1],
                   "margin": None if scores[0] is None else scores[0] - scores[1], "pair_source": cfg.by}
            rows.append({name: row[name] for name in schema})
        table = pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)
        extras = [c for c in frame.columns if c not in schema and c not in RESPONSE_COLUMNS
                  and not c.startswith(RESPONSE_PREFIXES) and c not in (cfg.group, cfg.score)]
        rows_of_chosen = pl.Series([p.chosen.row for p in pairs], dtype=pl.UInt32)
        return table.hstack(frame.select([pl.col(c).gather(rows_of_chosen) for c in extras]))

    def _scores(self, chosen: Response, rejected: Response) -> tuple[Optional[float], Optional[float]]:
        cfg = self.config
        if cfg.by == "judge":
            return chosen.score, rejected.score
        if cfg.by == "verified" or cfg.require_correct:
            return 1.0, 0.0
        return None, None

    def _skipped_frame(self, skipped: list[dict], frame):
        import polars as pl

        from datamill.records import MESSAGES_DTYPE

        schema = {self.config.group: pl.String, "prompt": MESSAGES_DTYPE, "responses": pl.Int64,
                  "reason": pl.String, "reason_kind": pl.String}
        columns = {self.config.group: [None if row["group"] is None else str(row["group"]) for row in skipped],
                   **{name: [row[name] for row in skipped] for name in ("prompt", "responses", "reason", "reason_kind")}}
        return pl.DataFrame(columns, schema=schema)


def reason_kind(reason: str) -> str:
    """The kind of a skipped group's reason, for counting: 'all correct', 'margin too small', ..."""
    return reason.split(":", 1)[0].split(" (", 1)[0]


def _groups(responses: list[Response]) -> dict:
    """Responses by group value, groups in order of first appearance, responses in input order."""
    groups: dict = {}
    for response in responses:
        groups.setdefault(response.group, []).append(response)
    return groups


def _split(messages, step: str, table: str, index: int) -> tuple[list[dict], str]:
    """A response row's conversation -> (prompt turns, reply text)."""
    from datagen.requests import split_last_turn

    prompt, reply = split_last_turn(messages if messages else None)
    if reply is None:
        raise DatamillError(f"pairs step '{step}': row {index + 1} of '{table}' does not end with an assistant "
                            "turn: pairs reads sampled responses (prompt turns + one assistant reply), as "
                            "`generate` with `input:` writes them")
    if not any(m["role"] == "user" for m in prompt):
        raise DatamillError(f"pairs step '{step}': row {index + 1} of '{table}' has no user turn before its "
                            "reply: a pair needs the prompt the responses answer")
    return prompt, reply or ""


def _verify(text: str, answer, family, cfg: PairsConfig) -> tuple[Optional[bool], Optional[str]]:
    """(correct, None), or (None, why the row has no checkable answer)."""
    from datagen.verify import FAMILIES_WITHOUT_ANSWER, is_correct

    if family is None:
        return None, f"no answer: no '{cfg.family}' to read the answer by"
    if family in FAMILIES_WITHOUT_ANSWER:
        return None, f"no answer: the '{family}' family has no checkable answer"
    if answer is None or not str(answer).strip():
        return None, f"no answer: '{cfg.answer}' is empty"
    return is_correct(text, str(answer), str(family)), None


def _finite(value) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else float(value)


def _text(value) -> Optional[str]:
    return None if value is None else str(value)


def _turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]
