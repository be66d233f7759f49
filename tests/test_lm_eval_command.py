"""The `lm_eval` command an evaluate step records gives the step's numbers: run from a shell,
from another directory, after the spec's task folder is gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evals.harness import SHIPPED_TASKS

OWN_TASK = """\
task: my_capitals_mc
dataset_path: json
dataset_kwargs: {data_files: {test: data/test.jsonl, train: data/train.jsonl}}
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]
metadata: {version: 1.0}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from datamill.models import resolve_model

    return resolve_model("builtin:tiny-llama", base_dir=Path("."), cache_dir=tmp_path_factory.mktemp("models"))


def own_task_folder(folder: Path) -> None:
    """A multiple-choice task of your own with relative data files: capitals rows, a train split for few-shot."""
    (folder / "data").mkdir(parents=True)
    for split in ("test", "train"):
        lines = (SHIPPED_TASKS / "data" / f"capitals_{split}.jsonl").read_text().splitlines()[:10]
        (folder / "data" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "my_tasks.yaml").write_text(OWN_TASK)


def run_recorded(command: str, out: Path, cwd: Path) -> tuple[dict, list[dict]]:
    """Run a recorded command line as a shell would (lm_eval from this venv), with an output folder
    added; its results and per-example rows."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(f"{command} --output_path {out} --log_samples", shell=True, cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(out.rglob("samples_*.jsonl")).read_text().splitlines()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


@pytest.mark.slow  # two lm_eval CLI runs, each indexing lm-eval's ~15k tasks: ~70 s of CPU
def test_the_recorded_lm_eval_command_reproduces_the_steps_numbers(write_spec, tiny, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from datamill.api import run
    from datamill.run_tracking import tracking_target

    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(tiny.parent))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))  # the CLI inherits it
    own_task_folder(tmp_path / "my_tasks")
    # lm-eval's own defaults differ from each of these: its seeds are 0,1234,1234,1234, no chat
    # template (the tiny model's tokenizer has one), the task's max_gen_toks is 48, batch size 1.
    spec = write_spec("""
name: cmd
models: {tiny: builtin:tiny-llama}
steps:
  score:
    evaluate: {model: tiny, tasks: [datamill_capitals_exact, my_capitals_mc], include_path: [my_tasks],
               limit: 6, num_fewshot: 2, seed: 7, gen_kwargs: {max_gen_toks: 8}, batch_size: 4}
""")
    result = run(spec)
    point = result.points[-1]
    step = point.steps["score"]
    commands = step.stats["lm_eval_command"]
    assert set(commands) == {"datamill_capitals_exact", "my_capitals_mc"} and step.stats["apply_chat_template"]
    tags = MlflowClient(tracking_uri=tracking_target(point.plan)[0]).get_run(point.run_id).data.tags
    assert tags["step.score.lm_eval_command.my_capitals_mc"] == commands["my_capitals_mc"]
    table = result.table("score")

    (tmp_path / "my_tasks").rename(tmp_path / "moved")  # the command reads its own copy of your folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    results, samples = run_recorded(commands["datamill_capitals_exact"], tmp_path / "cli_exact", elsewhere)
    ours = table.filter(table["task"] == "datamill_capitals_exact").sort("doc_id")
    assert len(samples) == ours.height == 6
    # the same prompts (chat template), generations (8 tokens at most) and scores
    assert [s["arguments"]["gen_args_0"]["arg_0"] for s in samples] == ours["prompt"].to_list()
    assert ours["prompt"][0].startswith("<|im_start|>")
    assert [s["resps"][0][0] for s in samples] == ours["generation"].to_list()
    assert results["results"]["datamill_capitals_exact"]["exact_match,extract"] == \
        step.stats["tasks"]["datamill_capitals_exact"]["exact_match"]

    results, samples = run_recorded(commands["my_capitals_mc"], tmp_path / "cli_mc", elsewhere)
    ours = table.filter((table["task"] == "my_capitals_mc") & (table["metric"] == "acc")).sort("doc_id")
    assert len(samples) == ours.height == 6
    # two few-shot examples drawn with seed 7, as turns of the chat
    assert [s["arguments"]["gen_args_0"]["arg_0"] for s in samples] == ours["prompt"].to_list()
    assert ours["prompt"][0].count("<|im_start|>user") == 3
    for sample, loglikelihoods in zip(samples, ours["loglikelihoods"].to_list()):
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(loglikelihoods, abs=1e-6)
    assert results["results"]["my_capitals_mc"]["acc,none"] == pytest.approx(
        step.stats["tasks"]["my_capitals_mc"]["acc"], abs=1e-6)
