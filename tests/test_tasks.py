"""Offline task families: determinism, correct answers (recomputed independently), MC options,
the `tasks` step, the `generator: tasks` source form and the lm-eval export."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import warnings
from contextlib import redirect_stdout
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
from helpers_steps import run_step

from datagen.tasks import COUNTRIES_CSV, FAMILIES, generate_tasks
from datagen.tasks_step import TasksStep
from datamill.errors import FieldError
from datamill.records import CANONICAL_COLUMNS, row_id

ALL = list(FAMILIES)
DIFFICULTIES = ("easy", "medium", "hard")


def prompt_of(row) -> str:
    return row["messages"][0]["content"]


def reply_of(row) -> str:
    return row["messages"][1]["content"]


# --- determinism -------------------------------------------------------------------------

def test_deterministic_within_and_across_processes():
    rows = generate_tasks(None, 70, seed=5, difficulty="hard")
    assert rows == generate_tasks(None, 70, seed=5, difficulty="hard")
    code = ("import json; from datagen.tasks import generate_tasks; "
            "print(json.dumps(generate_tasks(None, 70, seed=5, difficulty='hard')))")
    # another hash seed: nothing may depend on hash() of strings
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert json.loads(out.stdout) == rows


def test_growing_n_keeps_the_prefix_and_seeds_differ():
    families = ["arithmetic", "capitals", "code"]
    short, long = generate_tasks(families, 30, seed=1), generate_tasks(families, 90, seed=1)
    assert long[:30] == short
    assert [r["family"] for r in long] == [families[k % 3] for k in range(90)]
    assert [r["task_seed"] for r in long] == list(range(90))
    other = generate_tasks(families, 30, seed=2)
    assert sum(a["messages"] != b["messages"] for a, b in zip(short, other)) > 20


def test_unknown_family_and_difficulty():
    with pytest.raises(ValueError, match=r"unknown task family 'arithmatic'; did you mean 'arithmetic'\?") as err:
        generate_tasks(["arithmatic"], 5, 0)
    assert all(name in str(err.value) for name in ALL)
    with pytest.raises(ValueError, match="difficulty"):
        generate_tasks(None, 5, 0, difficulty="extreme")
    assert generate_tasks(["chat"], 0, 0) == []


# --- answers, recomputed without the generators ------------------------------------------

@pytest.fixture(scope="module")
def rows_by_family():
    """~120 rows per family at each difficulty."""
    out: dict[str, list[dict]] = {f: [] for f in ALL}
    for difficulty in DIFFICULTIES:
        for row in generate_tasks(None, 120 * len(ALL), seed=3, difficulty=difficulty):
            out[row["family"]].append(row)
    return out


def test_arithmetic_answers(rows_by_family):
    digits = {"easy": 1, "medium": 2, "hard": 3}
    for row in rows_by_family["arithmetic"]:
        a, op, b = re.fullmatch(r"Compute (\d+) ([-+*]) (\d+)\. Answer with the number only\.", prompt_of(row)).groups()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert row["answer"] == reply_of(row) == str(expected)
        assert len(a) == len(b) == digits[row["difficulty"]]


def test_reverse_answers(rows_by_family):
    kinds = set()
    for row in rows_by_family["reverse"]:
        text = re.search(r'"(.+)"', prompt_of(row)).group(1)
        if "order of the words" in prompt_of(row):
            expected, kinds = " ".join(text.split()[::-1]), kinds | {"words"}
        else:
            expected, kinds = text[::-1], kinds | {"letters"}
        assert row["answer"] == reply_of(row) == expected != text
    assert kinds == {"words", "letters"}


def test_sort_answers(rows_by_family):
    for row in rows_by_family["sort"]:
        items = re.search(r"order: (.+)\. Answer with", prompt_of(row)).group(1).split(", ")
        numeric = "numbers" in prompt_of(row)
        expected = sorted(items, key=int) if numeric else sorted(items)
        assert row["answer"] == reply_of(row) == ", ".join(expected)
        assert items != expected  # never already sorted


def test_units_answers(rows_by_family):
    factors = {("kilometres", "metres"): 1000, ("kilograms", "grams"): 1000, ("hours", "minutes"): 60}
    seen = set()
    for row in rows_by_family["units"]:
        prompt = prompt_of(row)
        celsius = re.fullmatch(r"Convert (-?\d+) °C to degrees Fahrenheit, rounded to the nearest whole number\. "
                               r"Answer with the number only\.", prompt)
        if celsius:
            c = Decimal(celsius.group(1))
            expected = (c * 9 / 5 + 32).quantize(Decimal(1), rounding=ROUND_HALF_UP)
            seen.add("C->F")
        else:
            value, src, dst = re.fullmatch(r"Convert ([\d.]+) (\w+) to (\w+)\. Answer with the number only\.",
                                           prompt).groups()
            if (src, dst) in factors:
                expected = Decimal(value) * factors[src, dst]
            else:
                expected = Decimal(value) / factors[dst, src]
            seen.add(f"{src}->{dst}")
        assert Decimal(row["answer"]) == expected, prompt
        assert row["answer"] == reply_of(row) and "e" not in row["answer"].lower()
    assert len(seen) == 7


def test_code_answers_by_running_the_snippet(rows_by_family):
    for row in rows_by_family["code"]:
        snippet = re.search(r"```python\n(.*)\n```", prompt_of(row), re.S).group(1)
        out = io.StringIO()
        with redirect_stdout(out):
            exec(snippet, {})  # the generator's own snippets: plain Python, real builtins
        assert row["answer"] == reply_of(row) == out.getvalue().rstrip("\n")


def test_capitals_answers_from_the_csv(rows_by_family):
    with open(COUNTRIES_CSV, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert len(table) >= 100 and len({r["country"] for r in table}) == len(table)
    capital = {r["country"]: r["capital"] for r in table}
    continent = {r["country"]: r["continent"] for r in table}
    country_of = {r["capital"]: r["country"] for r in table}
    assert capital["France"] == "Paris" and capital["Australia"] == "Canberra" and continent["Brazil"] == "South America"
    for row in rows_by_family["capitals"]:
        prompt, reply = prompt_of(row), reply_of(row)
        if m := re.fullmatch(r"What is the capital of (?:the )?(.+)\?", prompt):
            assert row["answer"] == capital[m.group(1)]
        elif m := re.fullmatch(r"On which continent is (?:the )?(.+)\?", prompt):
            assert row["answer"] == continent[m.group(1)]
        else:
            m = re.fullmatch(r"Which country has (.+) as its capital\?", prompt)
            assert row["answer"] == country_of[m.group(1)]
        assert row["answer"] in reply and reply.endswith(".")


def test_chat_answers_are_the_canonical_replies(rows_by_family):
    from datagen.tasks import CHAT_JSONL

    replies = {json.loads(line)["prompt"]: json.loads(line)["reply"] for line in CHAT_JSONL.read_text().splitlines()}
    assert len(replies) >= 40
    for row in rows_by_family["chat"]:
        assert row["answer"] == reply_of(row) == replies[prompt_of(row)]


def test_choices_hold_the_answer_once_among_four_distinct(rows_by_family):
    for family, rows in rows_by_family.items():
        positions = set()
        for row in rows:
            assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4, row
            assert row["choices"].count(row["answer"]) == 1
            assert all(c.strip() for c in row["choices"])
            positions.add(row["choices"].index(row["answer"]))
        assert positions == {0, 1, 2, 3}, family  # shuffled, not always first


# --- the step ----------------------------------------------------------------------------

def test_step_writes_canonical_rows_with_family_and_answer(tmp_path):
    config = {"families": ["arithmetic", "capitals", "chat"], "n": 30, "seed": 7, "difficulty": "easy"}
    ctx, tables = run_step(TasksStep, config, tmp_path, name="t")
    table = tables["main"]
    assert table.columns[:len(CANONICAL_COLUMNS)] == list(CANONICAL_COLUMNS)
    assert {"family", "answer", "difficulty", "choices", "task_seed"} <= set(table.columns)
    rows = table.to_dicts()
    expected = generate_tasks(config["families"], 30, 7, "easy")
    for row, want in zip(rows, expected):
        assert row["id"] == row_id(row["messages"]) and row["source"] == "t"
        assert row["gen_prompt"] is None and row["gen_model"] is None and row["gen_seed"] is None
        assert row["parent_id"] is None
        assert (row["messages"], row["family"], row["answer"], row["choices"]) == (
            want["messages"], want["family"], want["answer"], want["choices"])
        assert row["difficulty"] == "easy"
    assert ctx.stats["per_family"] == {"arithmetic": 10, "capitals": 10, "chat": 10}


def test_step_config_errors_and_key(tmp_path):
    from datamill.hashing import hash_file
    from datamill.step import Env

    with pytest.raises(FieldError) as err:
        run_step(TasksStep, {"families": ["arithmetic", "capitls"], "n": 3}, tmp_path)
    assert err.value.loc == ("families",) and "did you mean 'capitals'" in err.value.message
    with pytest.raises(Exception, match="greater than 0"):
        TasksStep.Config.model_validate({"n": 0})
    step = TasksStep("t", TasksStep.Config.model_validate({"n": 5}))
    assert step.config.families == ALL
    assert step.key_material(Env(base_dir=tmp_path))["countries"] == hash_file(COUNTRIES_CSV)


def test_generator_source_form_in_a_spec(write_spec):
    import datamill

    spec = write_spec("""\
name: t
tracking: {enabled: false}
sources:
  t: {generator: tasks, families: [arithmetic, sort], n: 12, seed: 0}
steps:
  per_family:
    sql: SELECT family, count(*) AS n FROM t GROUP BY family ORDER BY family
""")
    result = datamill.run(spec)
    assert result.table("per_family").to_dicts() == [{"family": "arithmetic", "n": 6}, {"family": "sort", "n": 6}]


# --- lm-eval export ----------------------------------------------------------------------

def load_task_yaml(path: Path) -> dict:
    """An lm-eval task YAML, with `!function x.y` read as the string "x.y"."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load(path.read_text(), Loader=Loader)


def test_lm_eval_export_builds_tasks_offline(tmp_path, monkeypatch):

    from datagen.lm_eval_export import export_lm_eval_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    families = ["arithmetic", "capitals", "code"]
    names = export_lm_eval_tasks(tmp_path / "lm", families, n=15, seed=1234, num_fewshot=2, fewshot_n=10)
    assert names == [f"datamill_{f}_{kind}" for f in families for kind in ("mc", "exact")]
    for name in names:
        config = load_task_yaml(tmp_path / "lm" / f"{name}.yaml")
        assert config["custom_dataset"] == "utils.load_split"  # rows read relative to the folder
        assert config["num_fewshot"] == 2 and config["fewshot_split"] == "train"
    monkeypatch.chdir(tmp_path.parent)  # the folder works from any directory

    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(tmp_path / "lm"), include_defaults=False)
    assert set(names) <= set(manager.all_tasks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tasks = get_task_dict(names, manager)
    # the test rows: the eval split at seed 1234, repeated questions skipped
    expected = {}
    for f in families:
        firsts = {}
        for row in generate_tasks([f], 60, 1234, split="eval"):
            firsts.setdefault(prompt_of(row), row)
        expected[f] = list(firsts.values())[:15]
        assert len(expected[f]) == 15
        config = load_task_yaml(tmp_path / "lm" / f"datamill_{f}_mc.yaml")
        assert config["metadata"]["n"] == 15 and config["metadata"]["split"] == "eval"
    for name in names:
        family = name.split("_")[1]
        task = tasks[name]
        docs = list(task.eval_docs)
        assert len(docs) == 15 and len({d["question"] for d in docs}) == 15
        for doc, row in zip(docs, expected[family]):
            assert doc["question"] == prompt_of(row)
            assert task.doc_to_text(doc) == f"Question: {prompt_of(row)}\nAnswer:"
            if name.endswith("_mc"):
                assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == row["answer"]
            else:
                assert task.doc_to_target(doc) == row["answer"]
        # few-shot examples come from the train split (another seed) and never repeat a test question
        shots = list(task.fewshot_docs())
        assert len(shots) == len({d["question"] for d in shots}) == 10
        assert [d["question"] for d in shots] == list(dict.fromkeys(
            prompt_of(r) for r in generate_tasks([family], 30, 1235)))[:10]
        assert not {d["question"] for d in shots} & {d["question"] for d in docs}
        context = task.fewshot_context(docs[0], num_fewshot=2)
        assert context.count("Question: ") == 3 and context.endswith(f"{prompt_of(expected[family][0])}\nAnswer:")


def test_lm_eval_exact_filters_extract_the_answer(tmp_path):
    from lm_eval.filters.extraction import RegexFilter

    from datagen.lm_eval_export import export_lm_eval_tasks

    export_lm_eval_tasks(tmp_path, ["arithmetic", "capitals", "sort"], n=3)
    cases = {"arithmetic": [("The answer is 58.", "58"), ("12 + 46 = -58", "-58")],
             "capitals": [("The capital of France is Paris.", "Paris"), ("It is Mexico City.", "Mexico City")],
             "sort": [("Answer: 3, 7, 12.", "3, 7, 12")]}
    for family, outputs in cases.items():
        config = load_task_yaml(tmp_path / f"datamill_{family}_exact.yaml")
        regex = config["filter_list"][0]["filter"][0]
        extract = RegexFilter(regex["regex_pattern"], regex["group_select"], regex["fallback"])
        for generation, answer in outputs:
            assert extract.apply([[generation]], [{}]) == [[answer]]
