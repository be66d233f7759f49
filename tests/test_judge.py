"""The `judge` step: verdict parsing, templates checked up front, pointwise and pairwise tables
(position bias cancelled by asking both orders), calibration against known answers, and the
request cache shared with `generate` (a second run sends nothing). Offline: a scripted backend,
and the fake OpenAI-compatible server for the real client."""

from __future__ import annotations

import re

import polars as pl
import pytest
from helpers_steps import run_step

from datagen import judging
from datagen.judge_step import JudgeStep
from datagen.verify import is_correct
from datamill.errors import FieldError
from datamill.records import row_id


class ScriptedJudge:
    """A judge backend for tests: `reply(request) -> text` decides each verdict (no model, no server)."""

    local = False  # built as cls(openai_config, model): no model folder to resolve
    calls: list[list[str]] = []
    reply = staticmethod(lambda request: "Score: 7")

    def __init__(self, config=None, model=None):
        from datagen.backends.base import BackendStats

        self.stats = BackendStats()

    def generate(self, requests, on_result) -> None:
        from datagen.backends.base import GenResult

        requests = list(requests)
        type(self).calls.append([r.id for r in requests])
        for r in requests:
            self.stats.sent += 1
            on_result(GenResult(id=r.id, text=type(self).reply(r), finish_reason="stop"))


@pytest.fixture
def scripted(monkeypatch):
    from datagen import backends

    monkeypatch.setitem(backends.BACKENDS, "openai", "test_judge:ScriptedJudge")
    ScriptedJudge.calls = []
    yield ScriptedJudge
    ScriptedJudge.reply = staticmethod(lambda request: "Score: 7")


def conversation(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame([{"id": row_id(r["messages"]) if "messages" in r else f"row{i}", **r}
                         for i, r in enumerate(rows)])


def judge(tmp_path, table: pl.DataFrame, name: str = "judged", **config):
    return run_step(JudgeStep, {"model": "judge-m", "backend": "openai", "input": "pool", **config}, tmp_path,
                    name=name, inputs={"pool": table})


def user_text(request) -> str:
    return request.messages[-1]["content"]


# --- parsing -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, score, reason", [
    ("Score: 7", 7, ""),
    ("7/10", 7, ""),
    ("**Rating:** 7", 7, ""),
    ('{"score": 7, "reason": "clear and correct"}', 7, "clear and correct"),
    ('Here is my verdict: {"Rating": 3}', 3, ""),
    ("Rating: [[8]]", 8, ""),
    ("[[9]]", 9, ""),
    ("The answer is right but terse.\n\nScore: 6.5", 6.5, "The answer is right but terse."),
    ("Step 1 scored 2 points.\nOverall score: 8/10", 8, "Step 1 scored 2 points."),
    (" 4 ", 4, ""),
])
def test_scores_are_read_in_many_formats(text, score, reason):
    assert judging.parse_score(text, 1, 10) == (score, reason)


@pytest.mark.parametrize("text, kind", [
    ("I like this answer a lot.", "unparseable"),
    ("", "unparseable"),
    ("Score: 11", "out_of_scale"),
    ("Score: 0", "out_of_scale"),
])
def test_unreadable_or_out_of_scale_scores_are_errors(text, kind):
    with pytest.raises(judging.VerdictError) as err:
        judging.parse_score(text, 1, 10)
    assert err.value.kind == kind


@pytest.mark.parametrize("text, choice", [
    ("[[A]]", "A"),
    ("Both are fine, but B is more precise.\n[[B]]", "B"),
    ("Verdict: B", "B"),
    ("**Final verdict:** Response A", "A"),
    ("tie", "tie"),
    ("It's a tie.", "tie"),
    ("[[C]]", "tie"),
    ('{"winner": "B", "reason": "more accurate"}', "B"),
    ("A", "A"),
])
def test_choices_are_read_in_many_formats(text, choice):
    assert judging.parse_choice(text)[0] == choice


def test_unreadable_choices_and_forbidden_ties_are_errors():
    with pytest.raises(judging.VerdictError, match="no verdict"):
        judging.parse_choice("Verdict: Both are good")
    with pytest.raises(judging.VerdictError) as err:
        judging.parse_choice("[[tie]]", tie=False)
    assert err.value.kind == "tie_not_allowed"


# --- templates ---------------------------------------------------------------------------

def test_shipped_templates_load_and_render(tmp_path):
    assert {"helpfulness", "correctness", "instruction_following", "reference", "pairwise"} <= set(
        judging.library_names())
    for name in judging.library_names():
        template = judging.load(name, tmp_path)
        messages = template.render(prompt="P?", response="R.", response_a="RA.", response_b="RB.", reference="REF")
        assert messages[-1]["role"] == "user" and "{" not in messages[-1]["content"]
    assert judging.load("reference", tmp_path).uses_reference
    assert judging.load("helpfulness", tmp_path).spec.scale == (1, 10)


@pytest.mark.parametrize("user, message", [
    ("Rate this: {prompt}", r"the variable \{response\} is missing"),
    ("Rate {response} given {answr}", r"\{answr\}, which a pointwise template does not have"),
    ("Rate {response} {", "Single '{'"),
])
def test_a_bad_template_is_a_clear_error_at_check_time(tmp_path, user, message):
    (tmp_path / "mine.yaml").write_text(f"mode: pointwise\nscale: [1, 5]\nuser: '{user}'\n")
    with pytest.raises(FieldError) as err:
        judge(tmp_path, frame([{"messages": conversation("q", "a")}]), template="mine.yaml")
    assert err.value.loc == ("template",) and "mine.yaml" in err.value.message
    assert re.search(message, err.value.message), err.value.message


def test_template_and_mode_must_agree_and_names_are_suggested(tmp_path):
    table = frame([{"messages": conversation("q", "a")}])
    with pytest.raises(FieldError, match="is pairwise but this step's mode is pointwise"):
        judge(tmp_path, table, template="pairwise")
    with pytest.raises(FieldError, match="did you mean 'helpfulness'"):
        judge(tmp_path, table, template="helpfulnes")


def test_a_spec_with_a_bad_template_fails_validation_naming_the_field(tmp_path):
    from datamill.api import load
    from datamill.errors import SpecError

    (tmp_path / "bad.yaml").write_text("mode: pointwise\nscale: [1, 10]\nuser: 'Rate {prompt}'\n")
    (tmp_path / "spec.yaml").write_text(
        "name: j\ntracking: {enabled: false}\nsources:\n  tasks: {generator: tasks, families: [arithmetic], n: 4}\n"
        "steps:\n  grade:\n    judge: {model: m, backend: openai, input: tasks, template: bad.yaml}\n")
    with pytest.raises(SpecError) as err:
        load(tmp_path / "spec.yaml").points()
    assert "steps.grade.judge.template" in str(err.value) and "{response}" in str(err.value)


# --- pointwise ---------------------------------------------------------------------------

def test_pointwise_scores_keep_the_rows_and_reject_unreadable_verdicts(tmp_path, scripted):
    replies = {"Paris": "Correct and concise.\nScore: 9", "Lyon": "7/10", "Nice": "I cannot decide.",
               "Metz": "Score: 42"}
    scripted.reply = staticmethod(lambda r: next(v for k, v in replies.items() if f"[Response]\n{k}" in user_text(r)))
    table = frame([{"messages": conversation("Capital of France?", city), "tag": i} for i, city in enumerate(replies)])
    ctx, tables = judge(tmp_path, table)
    rows, rejected = tables["main"], tables["rejected"]
    assert rows["judge_score"].to_list() == [9.0, 7.0] and rows.schema["judge_score"] == pl.Float64
    assert rows["judge_reason"].to_list() == ["Correct and concise.", ""]
    assert rows.drop("judge_score", "judge_reason", "judge_request_id", "judge_model").equals(table.head(2))
    assert set(rows["judge_model"]) == {"judge-m"} and rows["judge_request_id"].n_unique() == 2
    assert rejected["id"].to_list() == table["id"].to_list()[2:]
    assert rejected["reason_kind"].to_list() == ["unparseable", "out_of_scale"]
    assert rejected["raw"].to_list() == ["I cannot decide.", "Score: 42"]
    assert "outside the scale 1-10" in rejected["reason"][1]
    assert ctx.stats["judged"] == 2 and ctx.stats["rejected_by_reason"] == {"out_of_scale": 1, "unparseable": 1}
    assert ctx.stats["score_mean"] == 8.0 and "calibration" not in ctx.stats
    # the judge saw the prompt and the response, not the whole conversation as one blob
    (sent,) = scripted.calls
    assert len(sent) == 4


def test_rows_without_a_response_and_failed_requests_are_rejected(tmp_path, scripted):
    table = frame([{"messages": [{"role": "user", "content": "hello?"}]}, {"messages": conversation("q", "a")}])
    ctx, tables = judge(tmp_path, table)
    assert tables["rejected"]["reason_kind"].to_list() == ["no_response"] and tables["main"].height == 1
    assert len(scripted.calls[0]) == 1


def test_a_second_run_sends_no_request(tmp_path, scripted):
    table = frame([{"messages": conversation(f"q{i}", f"a{i}")} for i in range(5)])
    first = judge(tmp_path, table)[1]["main"]
    again_ctx, again = judge(tmp_path, table, name="again")  # another step, the same requests
    assert [len(c) for c in scripted.calls] == [5] and again_ctx.stats["sent"] == 0
    assert again_ctx.stats["requests_cached"] == 5 and again["main"].equals(first)


def test_through_the_openai_client_and_server_resume_sends_nothing(tmp_path):
    from fake_openai_server import FakeServer

    table = frame([{"messages": conversation(f"q{i}", f"a{i}")} for i in range(6)])
    with FakeServer() as server:
        config = {"openai": {"base_url": server.base_url, "max_in_flight": 4}}
        ctx, tables = judge(tmp_path, table, **config)
        assert len(server.hits) == 6
        # the fake server answers "Question: ... Answer: <seed>": no score, so rejected with the raw text
        rejected = tables["rejected"]
        assert rejected.height == 6 and set(rejected["reason_kind"]) == {"unparseable"}
        assert all(raw.startswith("Question: echo") for raw in rejected["raw"])
        ctx, _ = judge(tmp_path, table, name="again", **config)
        assert len(server.hits) == 6 and ctx.stats["sent"] == 0


# --- pairwise ----------------------------------------------------------------------------

def pairs(n: int) -> pl.DataFrame:
    return frame([{"chosen": conversation(f"q{i}", f"long good answer {i}"),
                   "rejected": conversation(f"q{i}", f"bad {i}"), "messages": conversation(f"q{i}", "x")}
                  for i in range(n)])


def test_a_judge_that_always_answers_a_gives_ties(tmp_path, scripted):
    scripted.reply = staticmethod(lambda r: "Verdict: A")
    ctx, tables = judge(tmp_path, pairs(4), mode="pairwise")
    rows = tables["main"]
    assert rows["judge_score_a"].to_list() == [0.5] * 4 and set(rows["judge_preference"]) == {"tie"}
    assert rows["judge_margin"].to_list() == [0.0] * 4 and not any(rows["judge_agreement"])
    assert all(len(ids) == 2 for ids in rows["judge_request_ids"].to_list())
    assert ctx.stats["first_position_rate"] == 1.0 and ctx.stats["position_consistency"] == 0.0
    assert ctx.stats["requests_total"] == 8 and ctx.stats["sent"] == 8


def test_a_consistent_judge_prefers_the_same_response_in_both_orders(tmp_path, scripted):
    def longer(r):  # prefers the longer response wherever it is shown
        text = user_text(r)
        a = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]", text, re.S).group(1)
        b = re.search(r"\[Response B\]\n(.*?)\n\n", text, re.S).group(1)
        return "[[A]]" if len(a) > len(b) else "[[B]]"

    scripted.reply = staticmethod(longer)
    table = pairs(4)
    table = table.with_columns(pl.when(pl.Series(range(4)) % 2 == 0).then(pl.col("chosen"))
                               .otherwise(pl.col("rejected")).alias("chosen"),
                               pl.when(pl.Series(range(4)) % 2 == 0).then(pl.col("rejected"))
                               .otherwise(pl.col("chosen")).alias("rejected"))
    ctx, tables = judge(tmp_path, table, mode="pairwise")
    rows = tables["main"]
    assert rows["judge_preference"].to_list() == ["a", "b", "a", "b"]
    assert rows["judge_score_a"].to_list() == [1.0, 0.0, 1.0, 0.0] and all(rows["judge_agreement"])
    assert rows["judge_margin"].to_list() == [1.0] * 4
    assert ctx.stats["position_consistency"] == 1.0 and ctx.stats["first_position_rate"] == 0.5
    assert rows["id"].to_list() == table["id"].to_list()


def test_pairwise_string_columns_take_the_prompt_from_the_conversation(tmp_path, scripted):
    seen = []
    scripted.reply = staticmethod(lambda r: seen.append(user_text(r)) or "tie")
    table = pl.DataFrame({"id": ["p"], "messages": [[{"role": "user", "content": "What is 2+2?"}]],
                          "left": ["4"], "right": ["five"]})
    _, tables = judge(tmp_path, table, mode="pairwise", pair=["left", "right"])
    assert tables["main"]["judge_preference"].to_list() == ["tie"]
    assert all("What is 2+2?" in text for text in seen) and "[Response A]\n4" in seen[0] and "[Response A]\nfive" in seen[1]


# --- calibration -------------------------------------------------------------------------

def task_rows() -> pl.DataFrame:
    """Task rows with known answers: about half answered right, half wrong, and some chat rows."""
    from datagen.tasks import generate_tasks

    rows = []
    for k, task in enumerate(generate_tasks(["arithmetic", "capitals", "chat"], n=36, seed=0)):
        reply = task["messages"][-1]["content"]
        if task["family"] != "chat" and k % 2:
            wrong = next(c for c in task["choices"] if c != task["answer"])
            reply = f"The answer is {wrong}."
        messages = task["messages"][:-1] + [{"role": "assistant", "content": reply}]
        rows.append({"id": row_id(messages), "messages": messages, "family": task["family"], "answer": task["answer"]})
    return pl.DataFrame(rows)


def response_of(request) -> str:
    return re.search(r"\[Response\]\n(.*?)\n\n", user_text(request), re.S).group(1)


def test_a_perfect_judge_beats_chance(tmp_path, scripted):
    table = task_rows()
    truth = {m[-1]["content"]: is_correct(m[-1]["content"], a, f)
             for m, a, f in zip(table["messages"].to_list(), table["answer"], table["family"]) if f != "chat"}
    assert 0 < sum(truth.values()) < len(truth)  # both classes present
    scripted.reply = staticmethod(lambda r: "Score: 9" if truth.get(response_of(r), True) else "Score: 2")
    ctx, tables = judge(tmp_path, table, template="correctness")
    calibration = ctx.stats["calibration"]
    assert calibration["n"] == len(truth) == 24 and calibration["accuracy"] == 1.0
    assert calibration["beats_chance"] and calibration["ci_low"] > calibration["chance"]
    side = tables["calibration"]
    assert side["scope"].to_list() == ["all", "arithmetic", "capitals"] and all(side["beats_chance"])
    assert "warning" not in ctx.stats


def test_a_constant_judge_is_no_better_than_chance_and_says_so(tmp_path, scripted):
    scripted.reply = staticmethod(lambda r: "Score: 9")  # "correct" whatever it reads
    ctx, tables = judge(tmp_path, task_rows(), template="correctness")
    calibration = ctx.stats["calibration"]
    assert not calibration["beats_chance"] and calibration["accuracy"] <= calibration["chance"]
    assert "no better than chance" in ctx.stats["warning"]


def test_pairwise_calibration_counts_pairs_with_one_correct_side(tmp_path, scripted):
    from datagen.tasks import generate_tasks

    rows = []
    for k, task in enumerate(generate_tasks(["arithmetic"], n=12, seed=1)):
        right = task["messages"]
        wrong = right[:-1] + [{"role": "assistant", "content": f"{int(task['answer']) + 1}"}]
        chosen, rejected = (right, wrong) if k % 3 else (wrong, right)
        rows.append({"id": f"pair{k}", "chosen": chosen, "rejected": rejected, "family": "arithmetic",
                     "answer": task["answer"]})
    table = pl.DataFrame(rows)

    def by_reference(r):  # the reference template shows the answer: pick the response that states it
        text = user_text(r)
        reference = re.search(r"\[Reference answer\]\n(.*?)\n", text).group(1)
        a = re.search(r"\[Response A\]\n(.*?)\n", text).group(1)
        return "[[A]]" if a.strip() == reference else "[[B]]"

    (tmp_path / "ref_pair.yaml").write_text(
        "mode: pairwise\nuser: \"[Question]\\n{prompt}\\n[Reference answer]\\n{reference}\\n"
        "[Response A]\\n{response_a}\\n[Response B]\\n{response_b}\\n\"\n")
    scripted.reply = staticmethod(by_reference)
    ctx, tables = judge(tmp_path, table, mode="pairwise", template="ref_pair.yaml")
    calibration = ctx.stats["calibration"]
    assert calibration["n"] == 12 and calibration["accuracy"] == 1.0 and calibration["beats_chance"]
    assert calibration["chance"] == round(8 / 12, 4)


def test_a_spec_runs_generate_then_judge_with_calibration(tmp_path, scripted):
    import datamill

    scripted.reply = staticmethod(lambda r: "Score: 8")
    (tmp_path / "spec.yaml").write_text(
        "name: j\ntracking: {enabled: false}\n"
        "sources:\n  tasks: {generator: tasks, families: [arithmetic, capitals, chat], n: 9, seed: 0}\n"
        "steps:\n  grade:\n    judge: {model: judge-m, backend: openai, input: tasks, template: reference}\n")
    result = datamill.run(tmp_path / "spec.yaml", quiet=True)
    rows, tasks = result.table("grade"), result.table("tasks")
    assert rows["id"].to_list() == tasks["id"].to_list()  # a judged row is the row it judged
    calibration = result.table("grade__calibration")
    assert calibration["scope"].to_list() == ["all", "arithmetic", "capitals"] and calibration["n"][0] == 6
    stats = result.points[0].steps["grade"].stats
    assert stats["calibration"]["accuracy"] == 1.0  # every task reply is right and the judge says so
    assert stats["rows"] == {"main": 9, "rejected": 0, "calibration": 3}
