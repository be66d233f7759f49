"""Training data that reaches an evaluation: `plan` and `run` warn when it overlaps the eval's
questions with no decontaminate step between them, and evaluate marks each contaminated example
and reports the clean subset next to the full set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import datamill
from datamill.overlap import contamination_warnings, exposures
from datamill.registry import register_step, unregister_step
from datamill.step import Step, StepConfig

ROOT = Path(__file__).resolve().parent.parent
CAPITALS = ROOT / "evals" / "tasks" / "data" / "capitals_test.jsonl"


class TuneConfig(StepConfig):
    data: str
    model: str


class TuneStep(Step):
    """A "fine-tuning" step that copies its base model (tests): the model it makes was trained on `data`."""

    kind = "tune"
    Config = TuneConfig
    produces_model = True

    def input_tables(self):
        return [(("data",), self.config.data)]

    def model_refs(self):
        return [(("model",), self.config.model)]

    def run(self, ctx) -> None:
        shutil.copytree(ctx.model_path(self.config.model), ctx.model_dir)


@pytest.fixture(autouse=True)
def tune_step():
    register_step(TuneStep)
    yield
    unregister_step("tune")


def _questions(k: int) -> list[str]:
    return [json.loads(line)["question"] for line in CAPITALS.read_text().splitlines()[:k]]


SPEC = """\
name: leak
tracking: {enabled: false}
models: {tiny: builtin:tiny-llama}
sources:
  train: {path: train.jsonl}
steps:
%(steps)s
  score:
    evaluate: {model: sft, tasks: [datamill_capitals_exact], limit: 8, apply_chat_template: false,
               gen_kwargs: {max_gen_toks: 4}, batch_size: 8}
"""


def _write(write_spec, steps: str, leaked: list[str]) -> Path:
    path = write_spec(SPEC % {"steps": steps})
    rows = [{"prompt": q, "response": "a city"} for q in leaked]
    rows += [{"prompt": f"Add {a} and {a + 2}.", "response": str(2 * a + 2)} for a in range(12)]
    (path.parent / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_run_warns_marks_contaminated_examples_and_reports_the_clean_subset(write_spec, capsys):
    leaked = [_questions(8)[i] for i in (1, 4)]  # two of the eight questions evaluated, word for word
    path = _write(write_spec, "  sft: {tune: {data: train, model: tiny}}", leaked)
    assert [e[:3] for e in exposures(datamill.plans(path)[0])] == [("score", "sft", "train")]
    result = datamill.run(path)
    printed = capsys.readouterr()
    assert "overlaps eval task datamill_capitals_exact" in printed.out + printed.err
    assert "2 of its" in printed.out + printed.err

    table = result.table("score")
    marked = table.select("doc_id", "contaminated").unique().sort("doc_id")
    assert marked["contaminated"].to_list() == [i in (1, 4) for i in range(8)]
    stats = result.points[0].steps["score"].stats
    assert stats["contaminated"] == {"datamill_capitals_exact": 2}
    assert stats["clean"]["datamill_capitals_exact"]["examples"] == 6
    assert "exact_match_ci_low" in stats["tasks"]["datamill_capitals_exact"]

    # `plan` says it too, from the built tables (measured once, then read from the workspace)
    warnings = contamination_warnings(datamill.plans(path)[0])
    assert [(w.table, w.task, w.overlapping) for w in warnings] == [("train", "datamill_capitals_exact", 2)]
    assert len(list((result.workspace.root / "contamination").glob("*.json"))) == 1


def test_a_decontaminate_step_in_between_silences_the_warning(write_spec):
    leaked = _questions(3)
    path = _write(write_spec, "  kept: {decontaminate: {input: train}}\n"
                              "  sft: {tune: {data: kept, model: tiny}}", leaked)
    assert exposures(datamill.plans(path)[0]) == []
    result = datamill.run(path)
    assert result.table("kept__removed").height == 3
    assert not any(result.table("score")["contaminated"].to_list())


def test_a_table_joined_with_undecontaminated_rows_still_warns(write_spec):
    path = _write(write_spec, "  kept: {decontaminate: {input: train}}\n"
                              "  joined: {sql: SELECT * FROM kept UNION ALL SELECT * FROM train}\n"
                              "  sft: {tune: {data: joined, model: tiny}}", _questions(1))
    assert [e[:3] for e in exposures(datamill.plans(path)[0])] == [("score", "sft", "joined")]
