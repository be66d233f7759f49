"""The `decontaminate` step and evals/contamination.py: Tulu 3's n-gram rule against lm-eval tasks
and eval tables, checked on planted cases and against a plain-Python reference."""

from __future__ import annotations

import random
import re
import unicodedata
from pathlib import Path

import polars as pl
import pytest
from helpers_steps import run_step

from datamill.errors import SpecError
from datamill.records import normalize_record
from datamill.step import Env, StepContext
from evals.contamination import contaminated_examples, eval_instances, words
from evals.decontaminate_step import DecontaminateStep

ADDED = ["eval_task", "eval_doc_id", "overlap", "matched_ngrams"]


def chat(user: str | list[str], assistant: str = "Sure.", **extra) -> dict:
    turns = [user] if isinstance(user, str) else user
    messages = []
    for turn in turns:
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": assistant}]
    return {**normalize_record({"messages": messages}, "test"), **extra}


def frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema_overrides={"gen_seed": pl.Int64})


def run_dc(tmp_path, table, evals: dict[str, pl.DataFrame] | None = None, name: str = "clean", **config):
    inputs = {"pool": table, **(evals or {})}
    config = {"input": "pool", **({"tables": list(evals)} if evals else {}), **config}
    return run_step(DecontaminateStep, config, tmp_path / name, name=name, inputs=inputs)


# --------------------------------------------------------------------------- planted cases

def instances(prefix: str, count: int, length: int) -> list[list[str]]:
    """`count` eval instances of `length` words each; no word is shared by two instances."""
    return [[f"{prefix}{i}x{j}" for j in range(length)] for i in range(count)]


def planted():
    """An eval table `bench` of 10 twenty-word instances, and training rows: copies, a paraphrase
    above the threshold, near misses at or under it, a copy in the answer only, a copy split over
    two turns, and unrelated rows."""
    bench = instances("b", 10, 20)
    text = [" ".join(ws) for ws in bench]
    other = "the weather today is mild with a light breeze from the west and some sun"
    rows = [
        chat(text[0].upper().replace(" ", ", ") + "?", tag="copy"),  # case and punctuation differ
        chat("Please help: " + " ".join(bench[1][:12]) + " lorem ipsum dolor sit amet consectetur adipiscing elit",
             tag="paraphrase"),  # 12 of 20 words in shared 8-grams: 0.6
        chat(" ".join(bench[2][:10]) + " and then something else entirely different here", tag="half"),  # 0.5: kept
        chat(" ".join(w if j % 7 != 6 else "zzz" for j, w in enumerate(bench[3])), tag="gappy"),  # no shared 8-gram
        chat("What do you know?", assistant=text[4], tag="answer"),  # only in the assistant's reply
        chat(other, tag="unrelated"),
        chat("Write a poem about " + other, tag="unrelated"),
        chat(text[0], tag="copy2"),
        chat([" ".join(bench[5][:10]), " ".join(bench[5][10:])], tag="split"),  # half per turn: 1.0 together
    ]
    return frame(rows), pl.DataFrame({"text": text}), bench


def test_planted_contamination_is_removed_and_reported(tmp_path):
    table, bench, words_of = planted()
    ctx, tables = run_dc(tmp_path, table, {"bench": bench})
    kept, removed, report = tables["main"], tables["removed"], tables["report"]

    assert kept.columns == table.columns
    assert kept["tag"].to_list() == ["half", "gappy", "answer", "unrelated", "unrelated"]
    assert removed.columns == table.columns + ADDED
    assert removed["tag"].to_list() == ["copy", "paraphrase", "copy2", "split"]
    assert removed["eval_task"].to_list() == ["bench"] * 4
    assert removed["eval_doc_id"].to_list() == [0, 1, 0, 5]
    assert removed["overlap"].to_list() == [1.0, 0.6, 1.0, 1.0]
    planted_ids = table.filter(pl.col("tag").is_in(["copy", "paraphrase", "copy2", "split"]))["id"]
    assert removed["id"].to_list() == planted_ids.to_list()
    paraphrase = removed.row(1, named=True)["matched_ngrams"]
    assert paraphrase == [" ".join(words_of[1][p:p + 8]) for p in range(5)]  # the first five of its matched 8-grams

    assert report.to_dicts() == [{"table": "pool", "eval_task": "bench", "eval_instances": 10,
                                  "overlapping_instances": 3, "share": 0.3, "flagged": True, "removed_rows": 4}]
    assert ctx.stats["tasks"] == {"bench": {"instances": 10, "overlapping": 3, "share": 0.3, "flagged": True}}
    assert ctx.stats["rows_in"] == 9 and ctx.stats["kept"] == 5 and ctx.stats["contaminated"] == 4
    assert DecontaminateStep("x", DecontaminateStep.Config(input="t", tables=["e"])).comparison_metrics(ctx.stats) == {}


def test_text_all_also_compares_the_answers(tmp_path):
    table, bench, _ = planted()
    _, tables = run_dc(tmp_path, table, {"bench": bench}, text="all")
    assert tables["removed"]["tag"].to_list() == ["copy", "paraphrase", "answer", "copy2", "split"]


def test_the_share_is_flagged_only_above_flag_share(tmp_path):
    big = [" ".join(ws) for ws in instances("g", 100, 10)]
    table = frame([chat(big[7]), chat(big[42]), chat("nothing to see here at all, none of it")])
    evals = {"big": pl.DataFrame({"text": big})}
    _, tables = run_dc(tmp_path, table, evals)  # 2 of 100 = 0.02: not more than 2 %
    assert tables["report"].select("share", "flagged", "removed_rows").row(0) == (0.02, False, 2)
    _, tables = run_dc(tmp_path, table, evals, name="strict", flag_share=0.01)
    assert tables["report"]["flagged"].to_list() == [True]


def test_flag_mode_keeps_every_row_and_marks_it(tmp_path):
    table, bench, _ = planted()
    ctx, tables = run_dc(tmp_path, table, {"bench": bench}, mode="flag")
    main = tables["main"]
    assert main.columns == table.columns + ["eval_task", "eval_doc_id", "overlap", "contaminated"]
    assert main.drop("eval_task", "eval_doc_id", "overlap", "contaminated").equals(table)
    marked = main.filter("contaminated")
    assert marked["tag"].to_list() == ["copy", "paraphrase", "copy2", "split"]
    assert marked["overlap"].to_list() == [1.0, 0.6, 1.0, 1.0]
    assert main.filter(~pl.col("contaminated"))["eval_task"].null_count() == 5
    assert tables["removed"].height == 0 and tables["removed"].columns == table.columns + ADDED
    assert tables["report"]["removed_rows"].to_list() == [4]
    assert ctx.stats["kept"] == 9 and ctx.stats["contaminated"] == 4


def test_exact_match_needs_the_whole_normalised_text(tmp_path):
    table, bench, words_of = planted()
    _, tables = run_dc(tmp_path, table, {"bench": bench}, match="exact")
    removed = tables["removed"]
    assert removed["tag"].to_list() == ["copy", "copy2"]  # not the paraphrase, nor the copy split over turns
    assert removed["overlap"].to_list() == [1.0, 1.0]
    assert removed["matched_ngrams"].to_list() == [[" ".join(words_of[0])]] * 2
    assert tables["report"]["overlapping_instances"].to_list() == [1]


def test_a_copied_question_is_found_without_its_template_frame(tmp_path):
    from evals.contamination import template_frames

    frames = template_frames(["datamill_capitals", "datamill_mmlu_dev"])
    assert frames["datamill_capitals_exact"] == ("Question: ", "\nAnswer:")  # "Question: {{question}}\nAnswer:"
    assert frames["datamill_mmlu_dev"] == ("", "\nAnswer:")  # the choices' "A." ... "D." lie between fields
    prompts = eval_instances(["datamill_capitals_exact"])["datamill_capitals_exact"]
    short = next(i for i, p in enumerate(prompts) if len(words([p])[0]) == 9)  # a 7-word question
    question = prompts[short].removeprefix("Question: ").removesuffix("\nAnswer:")
    table = frame([chat(question), chat("What is the capital of Atlantis, and who lives there?")])
    _, tables = run_dc(tmp_path, table, tasks=["datamill_capitals_exact"])
    assert tables["removed"].select("eval_doc_id", "overlap", "matched_ngrams").rows() == [
        (short, 1.0, [" ".join(words([question])[0])])]
    _, tables = run_dc(tmp_path, table, name="framed", tasks=["datamill_capitals_exact"], strip_template=False)
    assert tables["removed"].height == 0  # framed by "question" and "answer", it shares no 8-gram with the copy
    texts = [f"Q: which river flows through city {i}\nA:" for i in range(3)]  # 6 words in a frame of 2
    assert contaminated_examples(texts, ["Which river flows through city 1?"], frame=("Q:", "A:")) == [
        False, True, False]
    assert contaminated_examples(texts, ["Which river flows through city 1?"]) == [False] * 3


def test_a_short_instance_is_one_ngram_of_all_its_words(tmp_path):
    evals = {"short": pl.DataFrame({"text": ["Capital of Peru?", "a b c d e f g h i"]})}
    table = frame([chat("Quick: what is the capital of Peru? Thanks."), chat("capital of the peru")])
    _, tables = run_dc(tmp_path, table, evals)
    assert tables["removed"].select("eval_doc_id", "overlap", "matched_ngrams").to_dicts() == [
        {"eval_doc_id": 0, "overlap": 1.0, "matched_ngrams": ["capital of peru"]}]


def test_words_are_nfkc_lowercase_runs_of_letters_and_digits():
    assert words(["Ｈello, WORLD_x! Naïve café 3.14 don't"]) == [
        ["hello", "world", "x", "naïve", "café", "3", "14", "don", "t"]]
    assert contaminated_examples(["one two three four five six seven eight nine ten", "completely unrelated"],
                                 ["x ONE two three four five six seven eight nine ten y"]) == [True, False]


# --------------------------------------------------------------------------- lm-eval tasks

def test_eval_instances_are_lm_evals_prompts_and_groups_expand():
    found = eval_instances(["datamill_capitals", "datamill_mmlu_dev"])
    assert list(found) == ["datamill_capitals_mc", "datamill_capitals_exact", "datamill_mmlu_dev"]
    assert found["datamill_capitals_mc"] == found["datamill_capitals_exact"]
    first = found["datamill_capitals_exact"][0]
    assert first.startswith("Question: ") and first.endswith("\nAnswer:")
    assert found["datamill_mmlu_dev"][0].endswith("\nAnswer:") and "\nA. " in found["datamill_mmlu_dev"][0]
    assert eval_instances(["datamill_mmlu_dev"])["datamill_mmlu_dev"] == found["datamill_mmlu_dev"]  # cached


def test_decontaminates_against_lm_eval_tasks(tmp_path):
    tasks = eval_instances(["datamill_capitals", "datamill_mmlu_dev"])
    capitals, mmlu = tasks["datamill_capitals_exact"], tasks["datamill_mmlu_dev"]
    table = frame([chat(capitals[3]), chat("Tell me a joke about cats."), chat("Please answer: " + mmlu[7]),
                   chat("hi", assistant=mmlu[5])])
    ctx, tables = run_dc(tmp_path, table, tasks=["datamill_capitals", "datamill_mmlu_dev"])
    removed = tables["removed"]
    assert removed.select("eval_task", "eval_doc_id", "overlap").rows() == [
        ("datamill_capitals_mc", 3, 1.0), ("datamill_mmlu_dev", 7, 1.0)]
    report = {r["eval_task"]: r for r in tables["report"].to_dicts()}
    assert list(report) == ["datamill_capitals_mc", "datamill_capitals_exact", "datamill_mmlu_dev"]
    assert report["datamill_capitals_exact"]["overlapping_instances"] == 1
    assert report["datamill_capitals_exact"]["removed_rows"] == 1
    assert report["datamill_mmlu_dev"]["eval_instances"] == len(mmlu)
    assert report["datamill_mmlu_dev"]["share"] == 1 / len(mmlu)


def test_the_contamination_function_is_offered_to_other_stages():
    from datamill.registry import function

    mmlu = eval_instances(["datamill_mmlu_dev"])["datamill_mmlu_dev"]
    found = function("contamination")([mmlu[0], mmlu[1], "unrelated text"], {"datamill_mmlu_dev": []})
    assert found == {"datamill_mmlu_dev": {"instances": len(mmlu), "overlapping": 2, "share": 2 / len(mmlu)}}


def test_your_own_task_folder(tmp_path):
    folder = tmp_path / "spec" / "my_tasks"
    folder.mkdir(parents=True)
    (folder / "qa.jsonl").write_text('{"q": "Which river flows through the old town of Prague and Dresden?"}\n'
                                     '{"q": "Name the largest moon of Saturn."}\n')
    (folder / "my_qa.yaml").write_text("task: my_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                       "    test: qa.jsonl\ntest_split: test\noutput_type: generate_until\n"
                                       "doc_to_text: 'Q: {{q}}'\ndoc_to_target: ''\n"
                                       "metric_list:\n- metric: exact_match\n")
    table = frame([chat("which river flows through the old town of Prague and Dresden"), chat("Tell me about moons.")])
    _, tables = run_step(DecontaminateStep, {"input": "pool", "tasks": ["my_qa"], "include_path": ["my_tasks"]},
                         tmp_path / "run", name="clean", inputs={"pool": table}, base_dir=tmp_path / "spec")
    assert tables["removed"].select("eval_task", "eval_doc_id").rows() == [("my_qa", 0)]
    step = DecontaminateStep("c", DecontaminateStep.Config(input="pool", include_path=["../elsewhere"], tasks=["x"]))
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(Exception, match="outside the spec's folder"):
        step.check(Env(base_dir=tmp_path / "spec"))


# --------------------------------------------------------------------------- in a spec

SPEC = """
name: dc
models: {{tiny: builtin:tiny-llama}}
sources:
  pool: {{path: data/tasks.jsonl}}
steps:
  clean: {{decontaminate: {{input: pool{extra}}}}}
{evaluate}tracking: {{enabled: false}}
"""
EVALUATE = "  score: {{evaluate: {{model: tiny, tasks: [{tasks}]}}}}\n"


def spec_plan(write_spec, extra: str = "", tasks: str | None = "datamill_capitals_exact"):
    from datamill.api import plans

    evaluate = EVALUATE.format(tasks=tasks) if tasks else ""
    (plan,) = plans(write_spec(SPEC.format(extra=extra, evaluate=evaluate)))
    return plan


def test_without_tasks_the_spec_s_evaluate_tasks_are_used(write_spec, tmp_path):
    plan = spec_plan(write_spec)
    planned = plan.by_name("clean")
    assert planned.step.resolved_tasks(plan.resolved.env) == {"datamill_capitals_exact": ()}
    assert planned.key != spec_plan(write_spec, tasks="datamill_mmlu_dev").by_name("clean").key

    # run only this step (the evaluate step would need a model), with the spec's env
    capitals = eval_instances(["datamill_capitals_exact"])["datamill_capitals_exact"]
    table = frame([chat(capitals[0]), chat("Compute 2 + 2.")])
    (tmp_path / "in").mkdir()
    table.write_parquet(tmp_path / "in" / "pool.parquet")
    ctx = StepContext(name="clean", kind="decontaminate", key=planned.key, out_dir=tmp_path / "out",
                      state_dir=tmp_path / "state", shared_dir=tmp_path / "shared", env=plan.resolved.env,
                      input_paths={"pool": tmp_path / "in" / "pool.parquet"}, model_paths={})
    planned.step.run(ctx)
    report = pl.read_parquet(tmp_path / "out" / "tables" / "report.parquet")
    assert report.select("eval_task", "overlapping_instances", "removed_rows").rows() == [
        ("datamill_capitals_exact", 1, 1)]
    assert pl.read_parquet(tmp_path / "out" / "tables" / "main.parquet").height == 1


def test_an_unknown_task_suggests_the_closest(write_spec):
    with pytest.raises(SpecError, match=r"steps\.clean\.decontaminate\.tasks\.0: unknown task 'datamill_mmlu_dv'; "
                                        r"did you mean 'datamill_mmlu_dev'\?"):
        spec_plan(write_spec, extra=", tasks: [datamill_mmlu_dv]")


def test_no_tasks_and_no_evaluate_step_is_a_clear_error(write_spec):
    with pytest.raises(SpecError, match=r"steps\.clean\.decontaminate\.tasks: no eval tasks to decontaminate against: "
                                        r"no evaluate step"):
        spec_plan(write_spec, tasks=None)


# --------------------------------------------------------------------------- against a reference

def reference(eval_texts: list[str], rows: list[list[str]], n: int = 8, threshold: float = 0.5) -> dict[int, tuple]:
    """The rule with plain Python sets of n-gram tuples: {row: (best overlap, eval index)}."""
    def tokens(text: str) -> list[str]:
        return re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", text).lower())

    evals = [tokens(t) for t in eval_texts]
    best: dict[int, tuple] = {}
    for r, segments in enumerate(rows):
        grams: set[tuple] = set()
        for segment in segments:
            ws = tokens(segment)
            for k in {n} | {len(e) for e in evals if 0 < len(e) < n}:
                grams.update(tuple(ws[i:i + k]) for i in range(len(ws) - k + 1))
        for d, e in enumerate(evals):
            span = min(n, len(e))
            covered = set()
            for i in range(len(e) - span + 1):
                if tuple(e[i:i + span]) in grams:
                    covered.update(range(i, i + span))
            overlap = len(covered) / len(e) if e else 0.0
            if overlap > threshold and (r not in best or overlap > best[r][0]):
                best[r] = (overlap, d)
    return best


def random_corpus(seed: int = 0, rows: int = 1500, evals: int = 200):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(400)]

    def sentence(k: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(k))

    eval_texts = [sentence(rng.randint(1, 30)) for _ in range(evals)]
    training = []
    for _ in range(rows):
        turns = [sentence(rng.randint(1, 50)) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.3:  # a slice of an eval instance, some words changed, inside a turn
            e = rng.choice(eval_texts).split()
            a = rng.randint(0, len(e))
            b = rng.randint(a, len(e))
            piece = [w if rng.random() > 0.05 else "changed" for w in e[a:b]]
            t = rng.randrange(len(turns))
            turns[t] = f"{turns[t]} {' '.join(piece)}. {sentence(3)}"
        training.append(turns)
    return eval_texts, training


def test_same_removed_rows_as_a_plain_python_reference(tmp_path, monkeypatch):
    import evals.contamination as contamination
    import evals.decontaminate_step as step_module

    eval_texts, training = random_corpus()
    table = frame([chat(turns) for turns in training])
    evals = {"ev": pl.DataFrame({"text": eval_texts})}
    expected = reference(eval_texts, training)
    assert 100 < len(expected) < len(training)

    _, tables = run_dc(tmp_path, table, evals)
    removed = tables["removed"].with_row_index()
    rows = {i: r for r, i in enumerate(table["id"].to_list())}
    found = {rows[r["id"]]: (r["overlap"], r["eval_doc_id"]) for r in removed.to_dicts()}
    assert set(found) == set(expected)
    assert all(found[r][0] == pytest.approx(expected[r][0], abs=1e-12) for r in expected)
    # the instance shown is the best one: the same overlap (the first among equals)
    ev_words = words(eval_texts)
    assert all(found[r][1] == expected[r][1] or ev_words[found[r][1]] == ev_words[expected[r][1]] for r in expected)

    # small shards and small expansion chunks give the same result
    monkeypatch.setattr(step_module, "_SHARD_ROWS", 97)
    monkeypatch.setattr(step_module, "_MIN_SHARD_ROWS", 1)
    monkeypatch.setattr(contamination, "_PAIR_BUDGET", 50)
    ctx, again = run_dc(tmp_path, table, evals, name="sharded")
    assert ctx.stats["shards"] == 16
    assert again["removed"].equals(tables["removed"]) and again["report"].equals(tables["report"])


def test_a_text_table_against_a_messages_table_and_an_empty_input(tmp_path):
    evals = {"held_out": frame([chat("Name every planet of the solar system in order from the sun outwards."),
                                chat("Unrelated question about cooking pasta al dente properly at home.")])}
    table = pl.DataFrame({"text": ["name every planet of the solar system in order from the sun outwards please",
                                   "how do I cook rice"], "n": [1, 2]})
    _, tables = run_dc(tmp_path, table, evals)
    assert tables["removed"].select("n", "eval_task", "eval_doc_id").rows() == [(1, "held_out", 0)]
    assert tables["main"]["n"].to_list() == [2]
    ctx, tables = run_dc(tmp_path, table.head(0), evals, name="empty")
    assert tables["main"].height == 0 and tables["removed"].height == 0
    assert tables["report"].select("overlapping_instances", "removed_rows").row(0) == (0, 0)


def test_a_shard_without_text_finds_nothing():
    from evals.contamination import build_index
    from evals.decontaminate_step import scan_shard

    index = build_index({"e": ["one two three"]})
    empty = pl.DataFrame({"row": [], "text": []}, schema={"row": pl.Int64, "text": pl.String})
    assert len(scan_shard(empty, index=index, threshold=0.5, match="ngram", workers=2).row) == 0
    one = pl.DataFrame({"row": [4], "text": ["One, two; three!"]})
    assert scan_shard(one, index=index, threshold=0.5, match="ngram", workers=3).row.tolist() == [4]
    import functools
    import pickle

    shard = functools.partial(scan_shard, index=index, threshold=0.5, match="ngram")
    again = pickle.loads(pickle.dumps(shard))  # what Ray ships to a worker
    assert again(one).row.tolist() == [4] and pickle.loads(pickle.dumps(again(one))).best_positions == {4: [0]}


@pytest.mark.slow
def test_on_ray_the_tables_are_those_of_a_local_run(tmp_path):
    ray = pytest.importorskip("ray")
    from datamill.shards import RayShards

    eval_texts, training = random_corpus(rows=2500)
    table = frame([chat(turns) for turns in training])
    evals = {"ev": pl.DataFrame({"text": eval_texts})}
    _, local = run_dc(tmp_path, table, evals)
    paths = {}
    for name, data in {"pool": table, **evals}.items():
        paths[name] = tmp_path / f"{name}.parquet"
        data.write_parquet(paths[name])
    step = DecontaminateStep("clean", DecontaminateStep.Config(input="pool", tables=["ev"]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ctx = StepContext(name="clean", kind="decontaminate", key="ray", out_dir=tmp_path / "ray",
                          state_dir=tmp_path / "s", shared_dir=tmp_path / "shared", env=Env(base_dir=tmp_path),
                          input_paths=paths, model_paths={}, shards=RayShards())
        step.run(ctx)
    finally:
        ray.shutdown()
    assert ctx.stats["executor"] == "ray" and ctx.stats["shards"] >= 2
    for side in ("main", "removed", "report"):
        assert pl.read_parquet(tmp_path / "ray" / "tables" / f"{side}.parquet").equals(local[side]), side


def test_what_the_step_cleans_against():
    env = Env(base_dir=Path("."), eval_tasks={"datamill_capitals_mc": (), "datamill_capitals_exact": ()})

    def cleans(**config):
        return DecontaminateStep("c", DecontaminateStep.Config(input="pool", **config)).cleans_against(env)

    assert cleans(tasks=["datamill_capitals"]) == {"datamill_capitals", "datamill_capitals_mc",
                                                   "datamill_capitals_exact"}
    assert cleans() == {"datamill_capitals", "datamill_capitals_mc", "datamill_capitals_exact"}  # the evaluate tasks
    assert cleans(tasks=["datamill_capitals_mc"]) == {"datamill_capitals_mc"}
    assert cleans(tasks=["datamill_mmlu_dev"], mode="flag") == set()  # flagged rows stay in the table
    assert cleans(tables=["held_out"]) == set()


# --------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("mode", ["remove", "flag"])
def test_streaming_in_tiny_batches_gives_the_tables_of_one_batch(tmp_path, monkeypatch, mode):
    import datamill.step

    eval_texts, training = random_corpus(seed=1, rows=300, evals=60)
    table = frame([chat(turns, n=i) for i, turns in enumerate(training)])
    evals = {"ev": pl.DataFrame({"text": eval_texts})}
    one_ctx, one = run_dc(tmp_path, table, evals, name="one", mode=mode)
    monkeypatch.setattr(datamill.step, "BATCH_ROWS", 7)  # 43 batches, the last one of 6 rows
    ctx, tiny = run_dc(tmp_path, table, evals, name="tiny", mode=mode)

    hit = (one["removed"] if mode == "remove" else one["main"].filter("contaminated"))["n"].to_list()
    assert len({n // 7 for n in hit}) > 20  # contaminated rows in many batches, at their first and last rows
    assert {n % 7 for n in hit} == set(range(7))
    assert ctx.stats["shards"] == 43 and one_ctx.stats["shards"] == 1
    for side in ("main", "removed", "report"):
        assert tiny[side].schema == one[side].schema, side
        assert tiny[side].equals(one[side]), side
    assert one["report"]["removed_rows"].to_list() == [len(hit)]
    for key in ("rows_in", "contaminated", "kept", "eval_instances", "tasks", "flagged_tasks", "rows"):
        assert ctx.stats[key] == one_ctx.stats[key], key


@pytest.mark.parametrize("mode", ["remove", "flag"])
def test_an_empty_input_from_sql_gives_empty_tables_with_its_columns(write_spec, mode):
    from datamill.api import run

    spec = write_spec(f"""
name: dc_empty
sources:
  pool: {{path: data/tasks.jsonl}}
steps:
  none: {{sql: "SELECT * FROM pool WHERE false"}}
  clean: {{decontaminate: {{input: none, tasks: [datamill_capitals_exact], mode: {mode}}}}}
tracking: {{enabled: false}}
""")
    result = run(spec, quiet=True)
    columns = result.table("none").schema
    assert result.table("none").height == 0 and "messages" in columns
    main, removed, report = (result.table(t) for t in ("clean", "clean__removed", "clean__report"))
    added = {"eval_task": pl.String, "eval_doc_id": pl.Int64, "overlap": pl.Float64,
             "matched_ngrams": pl.List(pl.String)}
    flags = {"eval_task": pl.String, "eval_doc_id": pl.Int64, "overlap": pl.Float64, "contaminated": pl.Boolean}
    assert main.height == 0 and main.schema == pl.Schema({**columns, **(flags if mode == "flag" else {})})
    assert removed.height == 0 and removed.schema == pl.Schema({**columns, **added})
    assert report.select("eval_task", "overlapping_instances", "removed_rows").rows() == [
        ("datamill_capitals_exact", 0, 0)]
    stats = result.points[-1].steps["clean"].stats
    assert stats["rows_in"] == 0 and stats["contaminated"] == 0 and stats["kept"] == 0
