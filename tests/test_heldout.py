"""The held-out split of the task families: the shipped eval sets never repeat a question and
share none with training pools (any seed, any difficulty); capitals holds out whole countries;
rows stay deterministic per split; the `tasks` step takes `split`; evals/tasks/ is what the
exporter writes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from datagen.tasks import DIFFICULTIES, FAMILIES, countries, eval_chat_prompts, eval_countries, generate_tasks

SHIPPED = Path(__file__).resolve().parent.parent / "evals" / "tasks"
MMLU = ("datamill_mmlu_dev.yaml", "data/mmlu_dev_test.jsonl")  # made by evals/mmlu_dev.py, not the exporter
POOL_N = 3000  # rows per family and (seed, difficulty)


def prompt_of(row) -> str:
    return row["messages"][0]["content"]


def shipped_tests() -> dict[str, list[dict]]:
    """family -> the rows of its shipped test split."""
    out = {}
    for path in sorted((SHIPPED / "data").glob("*_test.jsonl")):
        family = path.name.removesuffix("_test.jsonl")
        if family != "mmlu_dev":
            out[family] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return out


@pytest.fixture(scope="module")
def pools() -> dict[tuple[int, str], list[dict]]:
    """Train rows (the default split), POOL_N per family, at several seeds and every difficulty."""
    runs = [(0, "medium"), (1, "easy"), (42, "hard")]
    return {(seed, d): generate_tasks(None, POOL_N * len(FAMILIES), seed, d) for seed, d in runs}


# --- the shipped eval sets ---------------------------------------------------------------

def test_shipped_eval_splits_never_repeat_a_question():
    tests = shipped_tests()
    assert set(tests) == set(FAMILIES)
    for family, rows in tests.items():
        questions = [r["question"] for r in rows]
        assert len(set(questions)) == len(questions), family
        meta = (SHIPPED / f"datamill_{family}_mc.yaml").read_text()
        assert re.search(rf"^  n: {len(rows)}$", meta, re.M), family  # metadata n = rows written
        assert "split: eval" in meta
    # capitals and chat ship every held-out question: 3 kinds at medium for each eval country
    assert len(tests["capitals"]) == 3 * len(eval_countries()) >= 100
    assert {r["question"] for r in tests["chat"]} == set(eval_chat_prompts())
    assert all(len(tests[f]) == 100 for f in FAMILIES if f not in ("capitals", "chat"))


def test_pools_share_no_question_with_the_shipped_eval_sets(pools):
    shipped = {r["question"] for rows in shipped_tests().values() for r in rows}
    for (seed, difficulty), rows in pools.items():
        assert len(rows) == POOL_N * len(FAMILIES)
        leaked = {prompt_of(r) for r in rows} & shipped
        assert not leaked, (seed, difficulty, sorted(leaked)[:5])


def test_the_splits_are_disjoint_at_any_seed_and_difficulty(pools):
    for difficulty in DIFFICULTIES:
        held_out = {prompt_of(r) for r in generate_tasks(None, 400 * len(FAMILIES), 3, difficulty, split="eval")}
        assert len(held_out) > 1000
        for (_, d), rows in pools.items():
            assert not held_out & {prompt_of(r) for r in rows}, (difficulty, d)


# --- capitals: whole countries are held out ----------------------------------------------

def test_eval_countries_follow_the_documented_rule():
    """40 % of each continent's countries (halves up), lowest sha256("capitals:<country>")."""
    by_continent: dict[str, list[str]] = {}
    for c in countries():
        by_continent.setdefault(c.continent, []).append(c.country)
    expected = set()
    for names in by_continent.values():
        ranked = sorted(names, key=lambda n: hashlib.sha256(f"capitals:{n}".encode()).digest())
        expected |= set(ranked[:int(0.4 * len(names) + 0.5)])
    assert eval_countries() == expected
    assert len(expected) == 49 and len(countries()) - len(expected) == 76
    assert all(set(names) - expected for names in by_continent.values())  # train countries everywhere


def asked_country(prompt: str) -> str:
    """The country a capitals question is about, whichever way it asks."""
    country_of = {c.capital: c.country for c in countries()}
    if m := re.fullmatch(r"What is the capital of (?:the )?(.+)\?", prompt):
        return m.group(1)
    if m := re.fullmatch(r"On which continent is (?:the )?(.+)\?", prompt):
        return m.group(1)
    return country_of[re.fullmatch(r"Which country has (.+) as its capital\?", prompt).group(1)]


def test_train_capitals_never_ask_about_an_eval_country(pools):
    held_out = eval_countries()
    held_capitals = re.compile("|".join(rf"(?<!\w){re.escape(c.capital)}(?!\w)" for c in countries()
                                        if c.country in held_out))
    asked = set()
    for rows in pools.values():
        for row in rows:
            if row["family"] == "capitals":
                country = asked_country(prompt_of(row))
                assert country not in held_out, prompt_of(row)
                assert not held_capitals.search(row["messages"][1]["content"]), row["messages"]
                asked.add(country)
    assert asked == {c.country for c in countries()} - held_out  # every train country, in every direction
    for row in shipped_tests()["capitals"]:
        assert asked_country(row["question"]) in held_out


# --- determinism -------------------------------------------------------------------------

def test_rows_are_deterministic_per_split_across_processes():
    args = dict(families=None, n=70, seed=5, difficulty="hard")
    rows = {split: generate_tasks(**args, split=split) for split in ("train", "eval")}
    assert rows["train"] == generate_tasks(**args) == generate_tasks(**args, split="train")
    assert rows["eval"] == generate_tasks(**args, split="eval")
    assert not {prompt_of(r) for r in rows["train"]} & {prompt_of(r) for r in rows["eval"]}
    assert generate_tasks(None, 140, 5, "hard", split="eval")[:70] == rows["eval"]  # growing n keeps the prefix
    code = ("import json; from datagen.tasks import generate_tasks; print(json.dumps("
            "[generate_tasks(None, 70, seed=5, difficulty='hard', split=s) for s in ('train', 'eval')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "4321"})
    assert json.loads(out.stdout) == [rows["train"], rows["eval"]]
    with pytest.raises(ValueError, match="unknown split 'test'"):
        generate_tasks(None, 3, 0, split="test")


# --- the step ----------------------------------------------------------------------------

def test_the_step_split_option_in_a_spec(write_spec):
    import datamill

    def spec(split: str) -> Path:
        return write_spec(f"""\
name: heldout
tracking: {{enabled: false}}
sources:
  pool: {{generator: tasks, families: [capitals, chat], n: 40, seed: 0}}
  held: {{generator: tasks, families: [capitals, chat], n: 40, seed: 0, split: {split}}}
steps:
  made:
    tasks: {{families: [capitals], n: 10, seed: 3, split: {split}}}
""")

    result = datamill.run(spec("eval"))
    pool, held, made = (result.table(t).to_dicts() for t in ("pool", "held", "made"))
    assert [prompt_of(r) for r in pool] == [prompt_of(r) for r in generate_tasks(["capitals", "chat"], 40, 0)]
    assert [prompt_of(r) for r in held] == [prompt_of(r) for r in
                                             generate_tasks(["capitals", "chat"], 40, 0, split="eval")]
    assert [prompt_of(r) for r in made] == [prompt_of(r) for r in generate_tasks(["capitals"], 10, 3, split="eval")]
    assert not {prompt_of(r) for r in pool} & {prompt_of(r) for r in held}
    assert all(asked_country(prompt_of(r)) in eval_countries() for r in held + made if r["family"] == "capitals")
    assert all(prompt_of(r) in eval_chat_prompts() for r in held if r["family"] == "chat")
    # the split is part of the config, so of the cache key
    again = datamill.run(spec("train"))
    assert {name.split("@")[0] for name in again.executed} == {"made"}  # held = pool's config: pool's rows
    assert again.table("held")["messages"].to_list() == [r["messages"] for r in pool]
    assert again.table("made")["messages"].to_list() == [r["messages"] for r in generate_tasks(["capitals"], 10, 3)]

    from datagen.tasks_step import TasksStep

    with pytest.raises(Exception, match="split"):
        TasksStep.Config.model_validate({"n": 3, "split": "test"})


# --- the shipped folder is the exporter's output -----------------------------------------

def test_the_shipped_tasks_are_what_the_exporter_writes_by_default(tmp_path):
    from datagen.lm_eval_export import export_lm_eval_tasks

    export_lm_eval_tasks(tmp_path)  # = python -m datagen.lm_eval_export evals/tasks
    shipped = {p.relative_to(SHIPPED).as_posix() for p in SHIPPED.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts} - set(MMLU)
    fresh = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert shipped == fresh
    for rel in sorted(fresh):
        assert (SHIPPED / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
