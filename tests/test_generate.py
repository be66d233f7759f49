"""The GenQA `generate` step: prompt library, parsers, request ids, the resumable request cache,
provenance columns, cache keys, and the transformers backend (tiny-llama; SmolLM2 under -m slow)."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datagen import prompt_library
from datagen.generate_step import GenerateConfig, GenerateStep, plan_requests
from datagen.parsing import ParseError, parse
from fake_backend import FakeBackend

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
GENQA_SPLITS = {"academic", "writing", "task", "math", "multiple_choice", "dialog", "code", "general"}

SPEC = """\
name: gen
tracking: {{enabled: false}}
models:
  m: ./model
steps:
  genqa:
    generate:
      model: m
      prompts: [academic, multiple_choice, dialog, math]
      n: {n}
      seed: 7
      temperature: 0.7
      max_tokens: 64
{extra}"""


def write(spec_dir: Path, n: int, extra: str = "") -> Path:
    path = spec_dir / "spec.yaml"
    path.write_text(SPEC.format(n=n, extra=extra))
    return path


def run(path: Path, overrides=None):
    import datamill

    return datamill.run(path, overrides, quiet=True)


def shard_lines(workspace: Path) -> list[str]:
    return [line for f in sorted((workspace / "shared" / "generate").rglob("shard-*.jsonl"))
            for line in f.read_text().splitlines()]


# --- prompt library ----------------------------------------------------------------------

def test_library_covers_the_genqa_splits_and_every_prompt_renders():
    names = prompt_library.library_names()
    assert GENQA_SPLITS <= set(names)
    families = set()
    for name in names:
        prompt = prompt_library.load(name, ROOT)
        families.add(prompt.family)
        assert prompt.category in GENQA_SPLITS
        for k in range(6):
            draw = prompt.draw(3, k)
            messages = prompt.render(draw)
            assert messages[-1]["role"] == "user" and messages[-1]["content"]
            if prompt.family != "static":
                assert 1 <= draw.index <= prompt.num_topics
                assert f"#{draw.index}" in messages[-1]["content"] or draw.topic in messages[-1]["content"]
            if prompt.family == "generator_nested":
                assert f"#{draw.subindex}" in messages[-1]["content"]
    assert families == set(prompt_library.FAMILIES)
    assert prompt_library.load("dialog", ROOT).parser == "dialog"
    assert prompt_library.load("multiple_choice", ROOT).parser == "multiple_choice"


def test_injected_indices_are_uniform_enough():
    prompt = prompt_library.load("writing", ROOT)
    counts = [0] * prompt.num_topics
    for k in range(3000):
        counts[prompt.draw(0, k).index - 1] += 1
    assert min(counts) > 50 and max(counts) < 150  # expected 100 each


@pytest.mark.parametrize("body, message", [
    ("family: static\ntemplate: hi\nparser: qa\nfoo: 1\n", "unknown key"),
    ("family: nested\ntemplate: hi\nparser: qa\n", "family"),
    ("family: conditional\ntemplate: '{{ topic }}'\nparser: qa\n", "needs a non-empty `topics:`"),
    ("family: generator_conditional\nnum_topics: 5\ntemplate: List 5 things.\nparser: qa\n",
     "never uses {{ index }}"),
    ("family: static\ntemplate: 'topic #{{ index }}'\nparser: qa\n", "does not provide"),
    ("family: generator_nested\nnum_topics: 5\ntemplate: '#{{ index }} #{{ subindex }}'\nparser: qa\n",
     "needs `num_subtopics:`"),
    ("family: static\ntemplate: '{% if %}'\nparser: qa\n", "Jinja syntax error"),
    ("family: static\ntemplate: hi\nparser: json\n", "parser"),
])
def test_bad_prompt_files_are_explained(tmp_path, body, message):
    (tmp_path / "p.yaml").write_text(body)
    with pytest.raises(prompt_library.PromptError, match="p.yaml") as err:
        prompt_library.load("p.yaml", tmp_path)
    assert message in str(err.value)


def test_prompt_errors_are_spec_errors_with_did_you_mean(spec_dir):
    from datamill.api import load
    from datamill.errors import SpecError

    path = write(spec_dir, 4).read_text().replace("dialog", "dialogue")
    (spec_dir / "spec.yaml").write_text(path)
    with pytest.raises(SpecError) as err:
        load(spec_dir / "spec.yaml").points()
    msg = str(err.value)
    assert "steps.genqa.generate.prompts.2" in msg and "did you mean 'dialog'" in msg and "spec.yaml:9:44" in msg
    (spec_dir / "spec.yaml").write_text(path.replace("dialogue", "prompts/mine.yaml"))
    with pytest.raises(SpecError, match="prompt file 'prompts/mine.yaml' does not exist"):
        load(spec_dir / "spec.yaml").points()


def test_users_own_prompt_file(spec_dir, fake):
    (spec_dir / "prompts").mkdir()
    (spec_dir / "prompts" / "mine.yaml").write_text(
        "name: fruit_qa\nfamily: conditional\ncategory: fruit\ntopics: [apple, pear, plum]\n"
        "system: You are terse.\ntemplate: 'Ask and answer a question about {{ topic }}.'\nparser: qa\n")
    path = write(spec_dir, 6)
    path.write_text(path.read_text().replace("[academic, multiple_choice, dialog, math]", "[prompts/mine.yaml]"))
    FakeBackend.malformed = 0
    table = run(path).table("genqa")
    assert table.height == 6
    assert set(table["gen_prompt"]) == {"fruit_qa"} and set(table["category"]) == {"fruit"}
    assert set(table["gen_topic"]) <= {"apple", "pear", "plum"}
    # editing the prompt file changes the step's key
    import datamill

    key = datamill.plans(path)[0].by_name("genqa").key
    (spec_dir / "prompts" / "mine.yaml").write_text((spec_dir / "prompts" / "mine.yaml").read_text()
                                                    .replace("terse", "brief"))
    assert datamill.plans(path)[0].by_name("genqa").key != key


# --- parsers -----------------------------------------------------------------------------

@pytest.mark.parametrize("parser, text, user, assistant", [
    ("qa", "Question: What is 2+2?\nAnswer: 4", "What is 2+2?", "4"),
    ("qa", "Topics:\n1. Optics\n2. Acoustics\n\n**Question:** Why is the sky blue?\n**Answer:** Rayleigh scattering.",
     "Why is the sky blue?", "Rayleigh scattering."),
    ("qa", "Question: first?\nAnswer: one\n\n### Question 2: second?\n- **Answer**: two", "second?", "two"),
    ("qa", "question: lower case?\nANSWER: yes", "lower case?", "yes"),
    ("qa", 'The question is: "Which?"\nThe answer is: "That."', "Which?", "That."),
    ("qa", "Question: q?\nAnswer: a\nQuestion: a dangling one", "q?", "a"),
    ("code", "Question: Print hi.\nAnswer:\n```python\nprint('Answer: hi')\n```",
     "Print hi.", "```python\nprint('Answer: hi')\n```"),
    ("multiple_choice", "Question: Capital of France?\nA) Paris\nB) Rome\nC) Berlin\nD) Madrid\nAnswer: A",
     "Capital of France?\n\nA) Paris\nB) Rome\nC) Berlin\nD) Madrid", "A) Paris"),
    ("multiple_choice", "**Question:** 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\n**Correct answer:** (B) 4, since 2+2=4.",
     "2+2?\n\nA) 3\nB) 4\nC) 5\nD) 6", "B) 4\n\nsince 2+2=4."),
    ("multiple_choice", "Question: Largest?\nA) 1\nB) 2\nC) 3\nD) 4\nThe correct answer is D) 4.",
     "Largest?\n\nA) 1\nB) 2\nC) 3\nD) 4", "D) 4"),
])
def test_parsers_accept(parser, text, user, assistant):
    messages = parse(parser, text)
    assert messages[0] == {"role": "user", "content": user}
    assert messages[-1] == {"role": "assistant", "content": assistant}


def test_dialog_parser():
    text = "Topics: 1. Tea\n\nUser: Hi!\nAssistant: Hello.\n**User:** Tea?\n**Assistant:** Green.\nUser:"
    assert parse("dialog", text) == [
        {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Tea?"}, {"role": "assistant", "content": "Green."}]


@pytest.mark.parametrize("parser, text, reason", [
    ("qa", "", "empty output"),
    ("qa", "Here are 50 topics: 1. a 2. b", "no 'Question:' or 'Answer:' tag found"),
    ("qa", "Question: What is 2+2?", "no 'Answer:' tag found"),
    ("qa", "Answer: 4", "no 'Question:' tag found"),
    ("qa", "Question:\nAnswer: 4", "empty question"),
    ("qa", "Question: why?\nAnswer:   ", "empty answer"),
    ("code", "Question: Print.\nAnswer:\n```python\nprint(1)\n", "unclosed code fence"),
    ("multiple_choice", "Question: x?\nA) 1\nB) 2\nAnswer: A", "missing options: C, D"),
    ("multiple_choice", "Question: x?\nA) 1\nB) 2\nC) 3\nD) 4\nAnswer: E", "answer 'E' is not one of the options"),
    ("multiple_choice", "Question: x?\nA) 1\nB) 2\nC) 3\nD) 4\nAnswer: none", "no answer letter"),
    ("multiple_choice", "Question: x?\nA) 1\nB) 2\nC) 3\nD) 4\nThe answer is a number", "no 'Answer:' tag"),
    ("dialog", "Assistant: hi", "no 'User:' turn found"),
    ("dialog", "User: hi\nUser: again\nAssistant: yes", "turns do not alternate"),
    ("dialog", "User: hi there", "no 'Assistant:' reply"),
    ("dialog", "User: hi\nAssistant:\nUser: ?\nAssistant: ok", "empty turn 2 (assistant)"),
])
def test_parsers_reject_with_reasons(parser, text, reason):
    with pytest.raises(ParseError) as err:
        parse(parser, text)
    assert reason in err.value.reason and err.value.kind


# --- requests: ids and indices -----------------------------------------------------------

def _config(**kw) -> GenerateConfig:
    return GenerateConfig(**{"model": "m", "prompts": ["academic", "math", "general"], "n": 20, **kw})


def _prompts(config):
    return [prompt_library.load(p, ROOT) for p in config.prompts]


def test_request_k_does_not_depend_on_n_or_the_process():
    small, big = _config(n=20), _config(n=30)
    a = plan_requests(small, _prompts(small), "model-x")
    b = plan_requests(big, _prompts(big), "model-x")
    assert [p.request for p in a] == [p.request for p in b[:20]]
    assert len({p.request.id for p in b}) == 30
    assert [p.request.seed for p in a[:3]] == [0, 1, 2]
    code = ("from pathlib import Path; from datagen.generate_step import GenerateConfig, plan_requests; "
            "from datagen import prompt_library as pl; "
            "c = GenerateConfig(model='m', prompts=['academic', 'math', 'general'], n=20); "
            "print(','.join(p.request.id for p in plan_requests(c, [pl.load(x, Path('.')) for x in c.prompts], 'model-x')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip().split(",") == [p.request.id for p in a]
    # what the request is made of changes its id
    for change in ({"temperature": 0.5}, {"top_p": 0.5}, {"max_tokens": 9}, {"seed": 1}):
        other = _config(**change)
        assert plan_requests(other, _prompts(other), "model-x")[0].request.id != a[0].request.id
    assert plan_requests(small, _prompts(small), "model-y")[0].request.id != a[0].request.id


def test_nested_prompts_inject_two_indices():
    config = _config(prompts=["academic"])
    draws = [p.draw for p in plan_requests(config, _prompts(config), "m")]
    assert all(d.index and d.subindex for d in draws)
    assert len({(d.index, d.subindex) for d in draws}) > 10


# --- running the step --------------------------------------------------------------------

def test_run_writes_rows_with_provenance_and_rejects_with_reasons(spec_dir, fake):
    result = run(write(spec_dir, 20))
    rows, rejected = result.table("genqa"), result.table("genqa__rejected")
    assert rows.height + rejected.height == 20
    assert rejected.height == 4  # seeds 7*1000003 + k with seed % 5 == 4
    for column in ("id", "messages", "source", "gen_prompt", "gen_model", "gen_seed", "parent_id", "category",
                   "gen_prompt_hash", "gen_index", "gen_subindex", "gen_sampling", "request_id"):
        assert column in rows.columns
    assert rows["source"].unique().to_list() == ["genqa"]
    assert rows["gen_model"].unique().to_list() == ["m"]
    assert set(rows["gen_prompt"]) == {"academic", "multiple_choice", "dialog", "math"}
    assert json.loads(rows["gen_sampling"][0]) == {"max_tokens": 64, "temperature": 0.7, "top_p": 0.95}
    academic = rows.filter(rows["gen_prompt"] == "academic")
    assert academic["gen_subindex"].null_count() == 0 and academic["gen_index"].null_count() == 0
    others = rows.filter(rows["gen_prompt"] != "academic")
    assert others["gen_subindex"].null_count() == others.height
    assert rows.filter(rows["gen_prompt"] == "math")["gen_topic"].null_count() == 0
    # rows in request order, whatever the completion order
    seeds = rows["gen_seed"].to_list()
    assert seeds == sorted(seeds)
    dialog = rows.filter(rows["gen_prompt"] == "dialog")["messages"][0].to_list()
    assert [m["role"] for m in dialog] == ["user", "assistant", "user", "assistant"]
    mc = rows.filter(rows["gen_prompt"] == "multiple_choice")["messages"][0].to_list()
    assert "D) " in mc[0]["content"] and mc[1]["content"].startswith("A) ")
    assert set(rejected["reason_kind"]) == {"no_tags", "no_user_turn"}  # qa-style and dialog prompts
    assert rejected["raw"][0].startswith("Sure! Here is a list")
    assert rejected.columns[:2] == ["request_id", "gen_prompt"] and "reason" in rejected.columns
    stats = result.points[0].steps["genqa"].stats
    assert stats["requests_total"] == 20 and stats["sent"] == 20 and stats["requests_cached"] == 0
    assert sum(stats["rejected_by_reason"].values()) == 4 and stats["parsed"] == 16


def test_growing_n_sends_only_the_new_requests(spec_dir, fake):
    path = write(spec_dir, 20)
    first = run(path)
    assert len(FakeBackend.calls) == 1 and len(FakeBackend.calls[0]) == 20
    second = run(write(spec_dir, 30))
    assert len(FakeBackend.calls) == 2 and len(FakeBackend.calls[1]) == 10
    assert not set(FakeBackend.calls[1]) & set(FakeBackend.calls[0])
    stats = second.points[0].steps["genqa"].stats
    assert stats["requests_cached"] == 20 and stats["sent"] == 10
    # the first 20 requests give the same rows as before
    old, new = first.table("genqa"), second.table("genqa")
    assert new.filter(new["request_id"].is_in(old["request_id"].to_list())).equals(old)
    # back to 20: the step is cached, nothing runs
    third = run(path)
    assert len(FakeBackend.calls) == 2 and third.points[0].steps["genqa"].cached


def test_execution_settings_do_not_change_the_key(spec_dir, fake):
    import datamill

    path = write(spec_dir, 8)
    key = datamill.plans(path)[0].by_name("genqa").key
    for override in ("batch_size=3", "device=cpu", "openai.max_in_flight=8", "openai.base_url=http://x:1/v1"):
        assert datamill.plans(path, [f"steps.genqa.generate.{override}"])[0].by_name("genqa").key == key
    assert datamill.plans(path, ["steps.genqa.generate.temperature=0.3"])[0].by_name("genqa").key != key
    # with the openai backend, base_url counts but concurrency and retries do not
    openai = write(spec_dir, 8, "      backend: openai\n")
    okey = datamill.plans(openai)[0].by_name("genqa").key
    for override in ("openai.max_in_flight=8", "openai.timeout_s=5", "openai.max_retries=1", "openai.backoff_s=0.1"):
        assert datamill.plans(openai, [f"steps.genqa.generate.{override}"])[0].by_name("genqa").key == okey
    assert datamill.plans(openai, ["steps.genqa.generate.openai.base_url=http://x:1/v1"])[0].by_name("genqa").key != okey
    assert GenerateStep("g", GenerateConfig(model="gpt", backend="openai", prompts=["math"], n=1)).model_refs() == []


def test_literal_api_key_is_a_spec_error(spec_dir):
    from datamill.api import load
    from datamill.errors import SpecError

    path = write(spec_dir, 4, "      backend: openai\n      openai: {api_key: sk-abc123}\n")
    with pytest.raises(SpecError) as err:
        load(path).points()
    assert "api_key_env" in str(err.value) and "steps.genqa.generate.openai.api_key" in str(err.value)


def test_failed_requests_fail_the_step_and_are_retried_by_the_next_run(spec_dir, fake):
    from datamill.errors import StepFailed

    path = write(spec_dir, 8, "      max_failed_fraction: 0\n")
    planned_ids = [p.request.id for p in _planned(spec_dir, 8)]
    FakeBackend.fail = {planned_ids[1], planned_ids[5]}
    with pytest.raises(StepFailed, match=r"2 of 8 requests failed \(request failed: HTTP 500.*re-run sends only"):
        run(path)
    FakeBackend.fail = set()
    again = run(path)
    assert FakeBackend.calls[-1] == [planned_ids[1], planned_ids[5]]
    stats = again.points[0].steps["genqa"].stats
    assert stats["resent_failed"] == 2 and stats["failed"] == 0 and stats["requests_cached"] == 6


def test_tolerated_failures_go_to_the_rejected_table(spec_dir, fake):
    planned_ids = [p.request.id for p in _planned(spec_dir, 8)]
    FakeBackend.fail = {planned_ids[1]}
    result = run(write(spec_dir, 8))  # by default failures are tolerated
    rejected = result.table("genqa__rejected")
    failed = rejected.filter(rejected["reason_kind"] == "request_failed")
    assert failed["request_id"].to_list() == [planned_ids[1]] and "HTTP 500" in failed["reason"][0]
    assert result.points[0].steps["genqa"].stats["failed"] == 1
    # the next run of the step (a new key) sends it again
    FakeBackend.fail = set()
    run(write(spec_dir, 9))
    assert FakeBackend.calls[-1][0] == planned_ids[1] and len(FakeBackend.calls[-1]) == 2


def test_truncated_outputs_are_rejected_unless_kept(spec_dir, fake):
    planned_ids = [p.request.id for p in _planned(spec_dir, 4)]
    FakeBackend.truncate, FakeBackend.malformed = {planned_ids[0]}, 0
    rejected = run(write(spec_dir, 4)).table("genqa__rejected")
    assert rejected["reason_kind"].to_list() == ["truncated"] and "max_tokens=64" in rejected["reason"][0]
    kept = run(write(spec_dir, 4), ["steps.genqa.generate.keep_truncated=true"]).table("genqa")
    assert kept["gen_finish_reason"].to_list()[0] == "length"


def _planned(spec_dir: Path, n: int):
    """The requests the spec's step will make (the model identity is the stand-in folder's)."""
    from datamill.models import model_identity

    config = GenerateConfig(model="m", prompts=["academic", "multiple_choice", "dialog", "math"], n=n, seed=7,
                            temperature=0.7, max_tokens=64)
    identity = model_identity(str((spec_dir / "model").resolve()), spec_dir)
    return plan_requests(config, [prompt_library.load(p, ROOT) for p in config.prompts], identity)


def test_torn_last_shard_line_is_ignored(spec_dir, fake):
    path = write(spec_dir, 6)
    run(path)
    workspace = spec_dir / ".datamill" / "gen"
    (shard,) = (workspace / "shared" / "generate").rglob("shard-*.jsonl")
    lines = shard.read_text().splitlines(keepends=True)
    torn_id = json.loads(lines[-1])["id"]
    shard.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a kill mid-write
    result = run(path, ["steps.genqa.generate.keep_truncated=true"])
    assert FakeBackend.calls[-1] == [torn_id]
    stats = result.points[0].steps["genqa"].stats
    assert stats["torn_lines"] == 1 and stats["requests_cached"] == 5
    assert result.table("genqa").height + result.table("genqa__rejected").height == 6


def test_sigkill_mid_run_resumes_without_loss_or_duplicates(spec_dir, fake):
    """A real `kill -9` of a run in the middle of generation, then a re-run."""
    path = write(spec_dir, 40)
    script = (
        "import datamill, sys\n"
        "from datagen import backends\n"
        "from fake_backend import FakeBackend\n"
        "backends.BACKENDS['transformers'] = 'fake_backend:FakeBackend'\n"
        "FakeBackend.delay_s = 0.05\n"
        f"datamill.run({str(path)!r}, quiet=True)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    workspace = spec_dir / ".datamill" / "gen"
    deadline = time.monotonic() + 60
    while len(shard_lines(workspace)) < 8 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {json.loads(line)["id"] for line in shard_lines(workspace) if line.endswith("}")}
    assert 8 <= len(done_before) < 40, proc.stderr.read().decode()[-2000:]

    result = run(path)
    (sent,) = FakeBackend.calls
    all_ids = [p.request.id for p in _planned(spec_dir, 40)]
    assert not set(sent) & done_before  # completed requests are not sent again
    assert set(sent) | done_before == set(all_ids)  # none is lost
    assert len(sent) == len(set(sent))
    table, rejected = result.table("genqa"), result.table("genqa__rejected")
    assert table.height + rejected.height == 40
    assert table["request_id"].n_unique() == table.height  # none is duplicated
    # and the resumed table is the same as a clean run's
    clean = spec_dir / "clean"
    clean.mkdir()
    (clean / "model").symlink_to(spec_dir / "model")
    FakeBackend.reset()
    clean_result = run(write(clean, 40))
    assert clean_result.table("genqa").drop("gen_model").equals(table.drop("gen_model"))


def test_vllm_missing_is_a_clear_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from datagen.backends.vllm_engine import VLLMBackend
    from datamill.errors import DatamillError

    with pytest.raises(DatamillError, match=r"pip install vllm.*available here: transformers, openai"):
        VLLMBackend(tmp_path)


# --- the transformers backend ------------------------------------------------------------

@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """Builtins built once for the module (DATAMILL_MODEL_CACHE wins when set: a shared cache)."""
    return Path(os.environ.get("DATAMILL_MODEL_CACHE") or tmp_path_factory.mktemp("models"))


def test_transformers_backend_on_tiny_llama(tmp_path, model_cache, monkeypatch):
    from datagen.backends.local import TransformersBackend
    from datamill.models import resolve_model

    folder = resolve_model("builtin:tiny-llama", base_dir=tmp_path, cache_dir=model_cache)
    config = GenerateConfig(model="m", prompts=["math", "general", "dialog"], n=5, max_tokens=8, temperature=1.0)
    requests = [p.request for p in plan_requests(config, _prompts(config), "tiny")]
    results = {}
    backend = TransformersBackend(folder, batch_size=4, device="cpu")
    backend.generate(requests, lambda r: results.__setitem__(r.id, r))
    assert set(results) == {r.id for r in requests}
    assert all(isinstance(r.text, str) and 0 < r.tokens_out <= 8 and r.tokens_in > 20 for r in results.values())
    assert backend.stats.sent == 5 and backend.stats.tokens_out == sum(r.tokens_out for r in results.values())
    # sampling is seeded per request: batch size and order do not change what is sampled, up to
    # float rounding between batch shapes, which can flip a near-tie of this random model's flat
    # distributions (seen on one CPU kind for one request of five). One global RNG would change all.
    again = {}
    TransformersBackend(folder, batch_size=1, device="cpu").generate(
        list(reversed(requests)), lambda r: again.__setitem__(r.id, r))
    same = [k for k in results if again[k].text == results[k].text]
    assert len(same) >= len(results) - 1, {k: (again[k].text, results[k].text) for k in results}

    # and through a spec, with the model resolved by the executor
    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(model_cache))
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: tiny\ntracking: {enabled: false}\nsteps:\n  g:\n    generate:\n"
                    "      model: builtin:tiny-llama\n      prompts: [general, code]\n      n: 4\n"
                    "      max_tokens: 8\n      batch_size: 2\n")
    result = run(spec)
    assert result.table("g").height + result.table("g__rejected").height == 4
    assert result.points[0].steps["g"].stats["tokens_out"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)  # 8 x 256 tokens of a real model on CPU: ~5 min on a loaded 2-core machine
def test_smollm2_writes_parseable_examples(tmp_path, model_cache, monkeypatch):
    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(model_cache))
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: smol\ntracking: {enabled: false}\nmodels:\n  smol: builtin:smollm2-135m-instruct\n"
                    "steps:\n  g:\n    generate:\n      model: smol\n      prompts: [writing, general, task, math]\n"
                    "      n: 8\n      temperature: 0.7\n      max_tokens: 256\n      batch_size: 8\n")
    result = run(spec)
    rows = result.table("g")
    assert rows.height >= 1, result.table("g__rejected")["reason"].to_list()
    assert all(m["content"].strip() for msgs in rows["messages"].to_list() for m in msgs)


def test_planning_a_generate_spec_imports_no_model_or_http_library(spec_dir):
    path = write(spec_dir, 4)
    code = ("import sys; from datamill.api import plans; from datamill.plan import describe\n"
            f"[describe(p) for p in plans({str(path)!r})]\n"
            "print([m for m in ('torch', 'transformers', 'polars', 'mlflow', 'aiohttp', 'openai') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_requests_in_executor_shards_write_the_table_of_one_pass(spec_dir, fake, tmp_path_factory, monkeypatch):
    import polars as pl

    from datamill import executor
    from datamill.shards import LocalShards

    class Slicing(LocalShards):  # runs here, but the step cuts its requests into shards as on Ray
        kind, workers = "test-slices", 2

    plain = run(write(spec_dir, 40))
    other = tmp_path_factory.mktemp("sharded")
    shutil.copytree(spec_dir / "model", other / "model")
    monkeypatch.setattr(executor, "make_shards", lambda config, work_lock=None: Slicing())
    sharded = run(write(other, 40))
    stats = sharded.points[0].steps["genqa"].stats
    assert stats["executor"] == "test-slices" and stats["shards"] == 8  # 40 requests, 4 shards per worker
    for table in ("genqa", "genqa__rejected"):
        assert pl.read_parquet(sharded.tables[table]).equals(pl.read_parquet(plain.tables[table])), table
    # the request cache got every result once: a re-run with a larger n sends only the new ones
    assert len(shard_lines(other / ".datamill" / "gen")) == 40


def test_backend_counters_of_the_shards_are_merged_once_per_backend():
    from datagen.generate_step import merge_backend_counters

    shared = {"batches": 3, "peak_in_flight": 8}  # one local backend, returned by each of its shards
    assert merge_backend_counters([shared, shared]) == {"batches": 3, "peak_in_flight": 8}
    # a backend per Ray task: counts add up, peaks do not
    assert merge_backend_counters([{"batches": 3, "peak_in_flight": 8}, {"batches": 2, "peak_in_flight": 5}]) == {
        "batches": 5, "peak_in_flight": 8}
