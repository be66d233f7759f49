"""Evaluation: the shipped lm-eval tasks, datamill vs the plain lm_eval CLI, metrics that can
fail (an answer-key model scores 100 %, a wrong one 0 %), the per-example table, the step."""

from __future__ import annotations

import json
import re
import subprocess
import warnings
import sys
from pathlib import Path

import pytest

from evals.harness import SHIPPED_TASKS

FAMILIES = ["arithmetic", "reverse", "sort", "capitals", "units", "code", "chat"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from datamill.models import resolve_model

    return resolve_model("builtin:tiny-llama", base_dir=Path("."), cache_dir=tmp_path_factory.mktemp("models"))


def task_rows(name: str) -> list[dict]:
    with open(SHIPPED_TASKS / "data" / f"{name}_test.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_shipped_tasks_load_from_any_directory(tmp_path, monkeypatch):
    from lm_eval.tasks import get_task_dict

    from evals.harness import task_index, task_manager

    names = [f"datamill_{f}_{kind}" for f in FAMILIES for kind in ("mc", "exact")] + ["datamill_mmlu_dev"]
    assert set(names) | {f"datamill_{f}" for f in FAMILIES} <= set(task_index())  # + a group per family
    monkeypatch.chdir(tmp_path)  # lm-eval would resolve relative data files against this
    with warnings.catch_warnings():  # get_task_dict is deprecated in favour of TaskManager.load
        warnings.simplefilter("ignore", DeprecationWarning)
        tasks = get_task_dict(names, task_manager())
    for name in names:
        docs = list(tasks[name].eval_docs)
        assert [d["id"] for d in docs] == [r["id"] for r in task_rows(name.split("_")[1] if "mmlu" not in name
                                                                      else "mmlu_dev")]
    mmlu = list(tasks["datamill_mmlu_dev"].eval_docs)
    assert len(mmlu) >= 250 and len({d["subject"] for d in mmlu}) >= 50
    assert tasks["datamill_mmlu_dev"].doc_to_text(mmlu[0]).endswith("\nD. " + mmlu[0]["choices"][3] + "\nAnswer:")


def test_mmlu_prompts_parse_into_questions_with_their_answer():
    from evals.mmlu_dev import parse

    text = ("The following are multiple choice questions (with answers) about algebra.\n\n"
            "Q: Find x if 2x = 4 and $\x0crac{x}{2}$ = 1.\n(A) 1 (B) 2 (C) 3 (D) 4\n"
            "A: Let's think step by step. 2x = 4 gives x = 2. The answer is (B).\n\n"
            "Q: A question without choices\nA: The answer is (A).")
    docs, skipped = parse({"algebra": text})
    assert skipped == 1 and len(docs) == 1
    assert docs[0]["question"] == "Find x if 2x = 4 and $\\frac{x}{2}$ = 1."  # the lost backslash is back
    assert docs[0]["choices"] == ["1", "2", "3", "4"] and docs[0]["label"] == 1


@pytest.mark.slow  # the lm_eval CLI indexes its ~15k tasks: ~35 s
def test_a_shipped_task_scores_the_same_through_datamill_and_the_lm_eval_cli(tiny, tmp_path):
    from evals.harness import evaluate, hf_model

    ours = evaluate(hf_model(tiny, device="cpu", batch_size=8), ["datamill_capitals_mc"], limit=25)
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny},dtype=float32",
                    "--device", "cpu", "--batch_size", "8", "--include_path", str(SHIPPED_TASKS),
                    "--tasks", "datamill_capitals_mc", "--limit", "25", "--output_path", str(out)],
                   check=True, capture_output=True, cwd=tmp_path)
    cli = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["datamill_capitals_mc"]
    assert ours.metrics["datamill_capitals_mc"]["acc"] == cli["acc,none"]
    assert ours.metrics["datamill_capitals_mc"]["acc_norm"] == cli["acc_norm,none"]
    assert ours.metrics["datamill_capitals_mc"]["acc_stderr"] == pytest.approx(cli["acc_stderr,none"])


class AnswerKey:
    """An lm-eval LM that reads the answer from the task data (or, `wrong`, never gives it)."""

    def __init__(self, wrong: bool = False):
        from lm_eval.api.model import LM

        answers = {row["question"]: row for f in FAMILIES for row in task_rows(f)}
        question = re.compile(r"Question: (.*)\nAnswer:\s*$", re.S)

        class Model(LM):
            def _row(self, context):
                return answers[question.search(context).group(1).split("Question: ")[-1]]

            def loglikelihood(self, requests):
                return [(0.0 if (cont.strip() == self._row(ctx)["answer"]) != wrong else -10.0, True)
                        for ctx, cont in (r.args for r in requests)]

            def loglikelihood_rolling(self, requests):
                return [0.0 for _ in requests]

            def generate_until(self, requests):
                return [("no idea" if wrong else f"The answer is {self._row(r.args[0])['answer']}") for r in requests]

        self.lm = Model()


@pytest.mark.parametrize("wrong, expected", [(False, 1.0), (True, 0.0)])
def test_exact_match_and_accuracy_can_reach_both_ends(wrong, expected):
    from evals.harness import evaluate

    tasks = ["datamill_arithmetic", "datamill_capitals_exact", "datamill_units_mc"]  # a family's group, tasks
    run = evaluate(AnswerKey(wrong).lm, tasks)
    assert run.metrics["datamill_arithmetic_exact"]["exact_match"] == expected
    assert run.metrics["datamill_capitals_exact"]["exact_match"] == expected
    assert run.metrics["datamill_units_mc"]["acc"] == expected
    # one row per example and metric, keyed by the task rows' own ids
    exact = [r for r in run.samples if r["task"] == "datamill_arithmetic_exact"]
    assert [r["id"] for r in exact] == [row["id"] for row in task_rows("arithmetic")]
    assert all(r["correct"] is (not wrong) for r in exact)
    assert all(r["target"] == row["answer"] for r, row in zip(exact, task_rows("arithmetic")))
    if not wrong:
        assert all(r["output"] == r["target"] for r in exact)  # the regex filter pulled the answer out
        assert exact[0]["generation"].startswith("The answer is")
    mc = [r for r in run.samples if r["task"] == "datamill_units_mc" and r["metric"] == "acc"]
    assert len(mc) == 100 and all(len(r["loglikelihoods"]) == 4 for r in mc)


def eval_spec(write_spec, tasks: str, extra: str = "") -> Path:
    return write_spec(f"""
name: ev
models: {{tiny: builtin:tiny-llama}}
steps:
  score:
    evaluate: {{model: tiny, tasks: {tasks}, limit: 6{extra}}}
tracking: {{enabled: false}}
""")


def test_evaluate_step_writes_metrics_results_and_a_per_example_table(write_spec, tiny, monkeypatch):
    from datamill.api import run

    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(tiny.parent))
    result = run(eval_spec(write_spec, "[datamill_capitals_mc, datamill_sort_exact]", ", apply_chat_template: false"))
    step = result.points[-1].steps["score"]
    table = result.table("score")
    assert table.height == 6 * 2 + 6  # acc and acc_norm per MC example, exact_match per generation
    assert set(table["id"].to_list()) == {r["id"] for r in task_rows("capitals")[:6] + task_rows("sort")[:6]}
    metrics = step.stats["tasks"]
    assert set(metrics["datamill_capitals_mc"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "acc_ci_low",
                                                    "acc_ci_high", "acc_norm_ci_low", "acc_norm_ci_high"}
    for m in ("acc", "acc_norm"):  # each metric inside its 95% bootstrap interval
        assert metrics["datamill_capitals_mc"][f"{m}_ci_low"] <= metrics["datamill_capitals_mc"][m] \
            <= metrics["datamill_capitals_mc"][f"{m}_ci_high"]
    assert metrics["datamill_capitals_mc"]["acc"] == table.filter(
        (table["task"] == "datamill_capitals_mc") & (table["metric"] == "acc"))["score"].mean()
    results = json.loads((step.tables[0].path.parent.parent / "results.json").read_text())
    assert set(results["results"]) == {"datamill_capitals_mc", "datamill_sort_exact"}
    again = run(eval_spec(write_spec, "[datamill_capitals_mc, datamill_sort_exact]", ", apply_chat_template: false"))
    assert again.points[-1].steps["score"].cached


def test_an_unknown_task_names_the_closest_and_the_available_ones(write_spec):
    from datamill.api import run
    from datamill.errors import SpecError

    with pytest.raises(SpecError, match=r"unknown task 'datamill_capitals_mcq'; did you mean 'datamill_capitals_mc'\?"
                                        r".*available: .*datamill_mmlu_dev"):
        run(eval_spec(write_spec, "[datamill_capitals_mcq]"))


# --------------------------------------------------------------------------- self-supervised (BYOD)


def test_negation_inserts_not_after_the_first_copula_where_grammatical():
    from evals.byod import negate

    assert negate("The sky is blue.") == "The sky is not blue."
    assert negate("They were late and it was cold.") == "They were late and it was not cold."  # is > was > are > were
    assert negate("Cats are mammals that is clear.") == "Cats are mammals that is not clear."
    assert negate("It is not true.") is None  # already negated: left out, as BYOD does
    assert negate("Birds fly south.") is None


def test_word_swap_keeps_the_multiset_of_words():
    import random
    from collections import Counter

    from evals.byod import _WORD, swap_two_words

    rng = random.Random(0)
    sentence = "The quick brown fox jumps over the lazy dog, twice."
    for _ in range(20):
        swapped = swap_two_words(sentence, rng)
        assert Counter(swapped.split()) == Counter(_WORD.findall(sentence))
        assert swapped != " ".join(_WORD.findall(sentence))
    assert swap_two_words("the the the", rng) is None


def test_chopped_tokenization_decodes_to_the_same_text(tiny):
    from transformers import AutoTokenizer

    from evals.byod import chopped_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    text = "Tokenization robustness: the same text, cut every five characters."
    ids = chopped_ids(tokenizer, text)
    assert tokenizer.decode(ids) == text and ids != tokenizer(text, add_special_tokens=False)["input_ids"]


def test_toxic_words_are_counted_as_whole_words_only():
    from evals.byod import count_toxic, toxic_words

    words = toxic_words()
    assert count_toxic("Fuck, you idiot!", words) == 2
    assert count_toxic("Scunthorpe assesses the classic bassist.", words) == 0


class Unigram:
    """A model whose next-token distribution depends on the current token only: it ignores all
    context, so the long-range metric must be ~0 for it."""

    def __new__(cls, vocab_size: int):
        import torch

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.table = torch.nn.Embedding(vocab_size, vocab_size)

            def forward(self, input_ids, attention_mask=None):
                return type("Out", (), {"logits": self.table(input_ids)})()

        return Model()


LONG_PARAGRAPHS = [
    " ".join(f"Sentence {k} of paragraph {p} says that the {w} is near the {v} in the old town today."
             for k, (w, v) in enumerate(zip(["river", "bridge", "tower", "market", "school", "garden", "harbour"],
                                            ["church", "station", "castle", "library", "museum", "square", "park"])))
    for p in range(6)]


@pytest.mark.slow  # ~25 s
def test_long_context_is_zero_for_a_model_that_ignores_context_and_not_for_a_real_one(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.byod import run_metric

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    rows, summary = run_metric("long_context", Unigram(len(tokenizer)), tokenizer, LONG_PARAGRAPHS)
    assert summary["examples"] == 6 and summary["score"] < 1e-9
    real = AutoModelForCausalLM.from_pretrained(tiny)
    _, summary = run_metric("long_context", real, tokenizer, LONG_PARAGRAPHS)
    assert summary["score"] > 1e-4  # a transformer sees the far context: the metric can fail


def test_self_supervised_metrics_in_the_evaluate_step(write_spec, tiny, monkeypatch):
    from datamill.api import run

    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(tiny.parent))
    spec = write_spec("""
name: byod
models: {tiny: builtin:tiny-llama}
sources:
  corpus: {path: corpus.jsonl, schema: raw}
steps:
  score:
    evaluate: {model: tiny, self_supervised: [negation, word_order, long_context], corpus: corpus, max_examples: 4}
tracking: {enabled: false}
""")
    (spec.parent / "corpus.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n"
                                                      for i, t in enumerate(LONG_PARAGRAPHS)))
    result = run(spec)
    table, stats = result.table("score"), result.points[-1].steps["score"].stats
    assert set(table["task"].to_list()) == {"byod_negation", "byod_word_order", "byod_long_context"}
    assert table.group_by("task").len()["len"].to_list() == [4, 4, 4]
    assert set(table["id"].to_list()) <= {f"p{i}" for i in range(6)}
    negated = table.filter(table["task"] == "byod_negation").row(0, named=True)
    assert negated["output"] == negated["target"].replace(" is ", " is not ", 1)
    for metric in ("byod_negation", "byod_word_order", "byod_long_context"):
        assert stats["tasks"][metric]["examples"] == 4 and "stderr" in stats["tasks"][metric]


def test_eval_command_sweeps_models_by_tasks_with_a_heatmap_on_the_parent(tiny, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from datamill.cli import app

    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(tiny.parent))
    out = tmp_path / "sweep"
    args = ["eval", "--models", f"builtin:tiny-llama,{tiny}", "--tasks", "datamill_capitals_mc,datamill_sort_exact",
            "--limit", "4", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "datamill_capitals_mc.acc" in result.output and "tasks x models" in result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{out / '.datamill' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("eval").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 3  # one parent, a child per model
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert all("datamill_capitals_mc.tasks.datamill_capitals_mc.acc" in c.data.metrics for c in children)
    artifacts = [a.path for a in client.list_artifacts(parents[0].info.run_id, "comparison")]
    assert artifacts == ["comparison/comparison.png", "comparison/comparison_bars.png"]
    # one more task: only its two (model, task) pairs run
    again = CliRunner().invoke(app, args[:4] + ["datamill_capitals_mc,datamill_sort_exact,datamill_units_mc"] + args[5:])
    assert again.exit_code == 0, again.output
    assert again.output.count("running") == 2


def test_examples_get_their_density_and_nearest_row_in_the_training_data(write_spec, tiny, monkeypatch):
    from datamill.api import run

    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(tiny.parent))
    first = task_rows("capitals")[0]
    train = [{"prompt": first["question"], "response": first["answer"]}] + [
        {"prompt": f"Compute {a} + {a + 3}. Answer with the number only.", "response": str(2 * a + 3)} for a in range(8)]
    spec = write_spec("""
name: analysis
models: {tiny: builtin:tiny-llama}
sources:
  train: {path: train.jsonl}
steps:
  score:
    evaluate: {model: tiny, tasks: [datamill_capitals_mc], limit: 4, training_data: train, apply_chat_template: false}
tracking: {enabled: false}
""")
    (spec.parent / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    result = run(spec)
    table, rows = result.table("score"), result.table("train")
    copied = rows.filter(rows["messages"].list.first().struct.field("content") == first["question"])["id"][0]
    by_example = table.unique("id", keep="first", maintain_order=True)
    assert by_example["nearest_train_id"][0] == copied  # the training row that is this test question
    assert by_example["nearest_train_similarity"][0] > by_example["nearest_train_similarity"][1:].max()
    assert by_example["train_log_density"][0] > by_example["train_log_density"][1:].max()
    assert set(table["nearest_train_id"].to_list()) <= set(rows["id"].to_list())


def test_your_own_task_folder_with_relative_data_files_works_from_anywhere(tmp_path, monkeypatch):
    from evals.harness import evaluate

    folder = tmp_path / "my_tasks"
    (folder / "data").mkdir(parents=True)
    rows = [{"id": f"q{i}", "question": f"Name colour number {i}.", "answer": "red"} for i in range(5)]
    (folder / "data" / "colours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "colours.yaml").write_text("""\
task: my_colours
dataset_path: json
dataset_kwargs: {data_files: {test: data/colours.jsonl}}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: answer
generation_kwargs: {until: ["\\n"], do_sample: false}
metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
metadata: {version: 1.0}
""")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # data/colours.jsonl does not exist relative to here
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))

    from lm_eval.api.model import LM

    class Model(LM):
        def loglikelihood(self, requests):
            return [(0.0, True) for _ in requests]

        def loglikelihood_rolling(self, requests):
            return [0.0 for _ in requests]

        def generate_until(self, requests):
            return ["red" for _ in requests]

    run = evaluate(Model(), ["my_colours"], include_paths=[folder])
    assert run.metrics["my_colours"]["exact_match"] == 1.0
    assert [r["id"] for r in run.samples] == [r["id"] for r in rows]
    assert "data/colours.jsonl" in (folder / "colours.yaml").read_text()  # your file is left as it is


def test_evaluation_is_deterministic_and_the_model_is_in_eval_mode(tiny):
    from evals.harness import evaluate, hf_model

    lm = hf_model(tiny, device="cpu")
    lm.model.train()  # even if something left it training
    first = evaluate(lm, ["datamill_arithmetic_exact"], limit=4)
    assert lm.model.training is False
    second = evaluate(lm, ["datamill_arithmetic_exact"], limit=4)
    assert [r["generation"] for r in first.samples] == [r["generation"] for r in second.samples]


def test_the_evaluation_key_follows_the_tasks_it_runs_not_the_whole_folder(tmp_path):
    import shutil

    from datamill.step import Env
    from evals.evaluate_step import EvaluateConfig, EvaluateStep

    folder = tmp_path / "tasks"
    (folder / "data").mkdir(parents=True)
    shutil.copy(SHIPPED_TASKS / "utils.py", folder)
    shutil.copy(SHIPPED_TASKS / "data" / "capitals_test.jsonl", folder / "data")
    mc = folder / "mine_mc.yaml"
    mc.write_text((SHIPPED_TASKS / "datamill_capitals_mc.yaml").read_text().replace("datamill_capitals_mc", "mine_mc"))
    (folder / "mine.yaml").write_text("group: mine\ntask:\n- mine_mc\n")

    def key():
        config = EvaluateConfig(model="m", tasks=["mine"], include_path=[str(folder)])
        return EvaluateStep("score", config).key_material(Env(base_dir=tmp_path))

    before = key()
    (folder / "other.yaml").write_text(mc.read_text().replace("task: mine_mc", "task: other"))
    assert key() == before  # a new task in the folder leaves this evaluation cached
    mc.write_text(mc.read_text().replace("num_fewshot: 0", "num_fewshot: 1"))
    assert key() != before  # a member of the group changed
    mc.write_text(mc.read_text().replace("num_fewshot: 1", "num_fewshot: 0"))
    (folder / "data" / "capitals_test.jsonl").write_text("")
    assert key() != before  # so did the data


def test_the_shipped_tasks_are_what_the_exporter_writes(tmp_path):
    """evals/tasks/ is generated (datagen/lm_eval_export.py, evals/mmlu_dev.py): a stale copy
    (an edited loader, task or row) fails here; regenerate with the two commands in README."""
    from datagen.lm_eval_export import export_lm_eval_tasks
    from evals import mmlu_dev

    export_lm_eval_tasks(tmp_path)  # its defaults are the shipped settings
    mmlu_dev.main([str(tmp_path)])
    shipped = {p.relative_to(SHIPPED_TASKS) for p in SHIPPED_TASKS.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    fresh = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert shipped == fresh
    for rel in sorted(fresh):
        assert (SHIPPED_TASKS / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


@pytest.mark.slow
def test_an_eval_sweep_on_ray_writes_the_tables_of_a_local_run(write_spec, tiny, monkeypatch):
    """Two models x (a task, a group, a self-supervised metric): on Ray every task and metric is a
    Ray task that loads the model itself; the tables are byte for byte the local ones."""
    ray = pytest.importorskip("ray")
    from datamill.api import run

    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(tiny.parent))
    spec = f"""
name: evsweep
models: {{model: builtin:tiny-llama}}
steps:
  score:
    evaluate: {{model: model, tasks: [datamill_capitals_mc, datamill_sort], self_supervised: [negation],
               limit: 4, max_examples: 4, apply_chat_template: false}}
sweep:
  models.model: ["builtin:tiny-llama", "{tiny}"]
tracking: {{enabled: false}}
"""
    local = run(write_spec(spec))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        on_ray = run(write_spec(spec.replace("name: evsweep", "name: evsweep_ray") + "executor: {kind: ray}\n"))
    finally:
        ray.shutdown()
    assert len(on_ray.points) == 2
    # the two points ran at the same time (a thread each, their Ray tasks overlapping)
    first, second = (on_ray.workspace.meta(p.plan.by_name("score").key) for p in on_ray.points)
    assert second["started_at"] < first["finished_at"] and first["started_at"] < second["finished_at"]
    for a, b in zip(local.points, on_ray.points):
        stats = b.steps["score"].stats
        assert stats["executor"] == "ray" and stats["shards"] == 3  # a task, a group, a metric
        assert a.plan.by_name("score").key == b.plan.by_name("score").key
        path = lambda result, point: result.workspace.table_path(point.plan.by_name("score").key, "main")
        assert path(local, a).read_bytes() == path(on_ray, b).read_bytes()
        assert stats["tasks"] == a.steps["score"].stats["tasks"]
