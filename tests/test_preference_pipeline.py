"""The second half of post-training through one spec: sampled answers -> judge -> pairs -> DPO on
builtin:tiny-llama, and a pair's lineage back to both answers' requests and the judge's verdicts.
The answers and verdicts come from a scripted backend (a tiny random model can neither answer nor
judge); the DPO training is real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SPEC = """
name: preference_pipeline
models: {tiny: builtin:tiny-llama}
sources:
  questions: {generator: tasks, families: [arithmetic], n: 12, seed: 3}
steps:
  answers: {generate: {model: scripted, backend: openai, input: questions, samples: 3}}
  judged: {judge: {model: scripted, backend: openai, input: answers, template: reference}}
  judge_pairs: {pairs: {input: judged, by: judge, margin: 2}}
  verified_pairs: {pairs: {input: answers, by: verified}}
  dpo:
    train: {model: tiny, data: judge_pairs, objective: dpo, beta: 0.1, max_steps: 3, max_len: 96, batch_size: 2,
            lora: {r: 4}, eval_fraction: 0.2}
tracking: {enabled: false}
"""


class ScriptedModel:
    """Answers arithmetic questions (right for even sampling seeds, off by one for odd ones) and
    grades answers against the reference the judge template shows (9 when right, 2 when wrong)."""

    local = False
    requests: list = []

    def __init__(self, config=None, model=None):
        from datagen.backends.base import BackendStats

        self.stats = BackendStats()

    def generate(self, requests, on_result) -> None:
        from datagen.backends.base import GenResult

        for r in requests:
            type(self).requests.append(r)
            self.stats.sent += 1
            on_result(GenResult(id=r.id, text=reply(r), finish_reason="stop"))


def reply(request) -> str:
    text = request.messages[-1]["content"]
    if "[Reference answer]" in text:
        reference = re.search(r"\[Reference answer\]\s*(.+)", text).group(1).strip()
        response = re.search(r"\[Response\]\s*(.+)", text).group(1).strip()
        right = re.findall(r"-?\d+", response)[-1:] == [reference]
        return f"The response {'matches' if right else 'contradicts'} the reference.\nScore: {9 if right else 2}"
    a, op, b = re.search(r"Compute (-?\d+) ([-+*]) (-?\d+)", text).groups()
    value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    return f"The answer is {value + request.seed % 2}."


@pytest.fixture
def scripted(monkeypatch):
    from datagen import backends

    monkeypatch.setitem(backends.BACKENDS, "openai", "test_preference_pipeline:ScriptedModel")
    ScriptedModel.requests = []
    return ScriptedModel


def test_answers_judge_pairs_dpo_and_a_pairs_lineage(write_spec, scripted, tmp_path):
    import datamill
    from datamill.lineage import lineage
    from datagen.verify import is_correct

    spec = write_spec(SPEC)
    result = datamill.run(spec, quiet=True)

    answers = result.table("answers")
    assert answers.height == 36 and answers["parent_id"].n_unique() == 12
    judged = result.table("judged")
    truth = [is_correct(m[-1]["content"], a, "arithmetic") for m, a in
             zip(judged["messages"].to_list(), judged["answer"].to_list())]
    assert [s >= 5 for s in judged["judge_score"].to_list()] == truth  # the script grades by the truth
    steps = result.points[-1].steps
    stats = steps["judged"].stats
    assert stats["calibration"]["accuracy"] == 1.0 and stats["calibration"]["beats_chance"]

    pairs = result.table("judge_pairs")
    assert pairs.height > 0 and set(pairs["pair_source"].to_list()) == {"judge"}
    for chosen, rejected, answer in zip(pairs["chosen"].to_list(), pairs["rejected"].to_list(),
                                        pairs["answer"].to_list()):
        assert is_correct(chosen[-1]["content"], answer, "arithmetic")
        assert not is_correct(rejected[-1]["content"], answer, "arithmetic")
    verified = result.table("verified_pairs")
    assert sorted(verified["id"].to_list()) == sorted(pairs["id"].to_list())  # same truth, same pairs

    dpo = steps["dpo"].stats
    assert dpo["objective"] == "dpo" and dpo["steps"] == 3 and dpo["train_pairs"] + dpo["eval_pairs"] == pairs.height
    assert abs(dpo["first_loss"] - 0.6931) < 1e-3  # the policy starts as its reference
    log = result.table("dpo__log")
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(log.columns)
    assert (Path(steps["dpo"].model_dir) / "config.json").is_file()

    # a pair's lineage: the pair, both answers (with their generation requests) and their verdicts
    pair = pairs.row(0, named=True)
    hits = lineage(spec, pair["id"])
    via = {(h["via"], h["table"]) for h in hits if "via" in h}
    assert {("chosen_id", "answers"), ("rejected_id", "answers"), ("chosen_id", "judged"),
            ("rejected_id", "judged")} <= via
    # (two samples with the same text share an id: a response's id can name several requests)
    requests = {h["row"]["request_id"] for h in hits if h.get("via") and h["table"] == "answers"}
    assert {pair["chosen_request_id"], pair["rejected_request_id"]} <= requests
    verdicts = [h["row"]["judge_request_id"] for h in hits if h.get("via") and h["table"] == "judged"]
    assert len(verdicts) >= 2 and all(verdicts)


def test_bad_preference_inputs_have_clear_errors(write_spec, scripted):
    import datamill
    from datamill.errors import SpecError, StepFailed

    # a reference model that does not exist
    bad = SPEC.replace("objective: dpo, beta: 0.1,", "objective: dpo, beta: 0.1, reference: no_such_model,")
    with pytest.raises(SpecError, match="no_such_model"):
        datamill.run(write_spec(bad, "bad_reference.yaml"), quiet=True)
    # DPO on a table without pairs
    bad = SPEC.replace("data: judge_pairs, objective: dpo", "data: answers, objective: dpo")
    with pytest.raises(StepFailed, match="has no 'prompt', 'chosen', 'rejected' column"):
        datamill.run(write_spec(bad, "bad_table.yaml"), quiet=True)
