"""The train step: loss masks, packing, goldfish, NEFTune, LoRA, resume, saving, learning (tiny-llama, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datamill.errors import SpecError, StepFailed

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny(model_cache):
    from datamill.models import resolve_model

    return resolve_model("builtin:tiny-llama", base_dir=Path("."), cache_dir=model_cache)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


@pytest.fixture
def cached_models(model_cache, monkeypatch):
    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(model_cache))


def load_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "5 times 4 is 20."},
]


def loss_text(tokenizer, example) -> list[str]:
    """Decoded runs of consecutive loss-bearing tokens."""
    runs, current = [], []
    for tok, lab in zip(example.input_ids, example.labels):
        if lab != -100:
            assert lab == tok  # a label is the token itself (the model shifts)
            current.append(tok)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# --------------------------------------------------------------------------- loss masks


def test_assistant_only_masking_on_a_multi_turn_example(tokenizer):
    from train.data import encode

    ex = encode(tokenizer, CONVERSATION, "assistant", max_len=512)
    assert loss_text(tokenizer, ex) == ["2 + 3 = 5.<|im_end|>", "5 times 4 is 20.<|im_end|>"]
    # every other token (system, user turns, role headers) is -100
    n_loss = sum(1 for x in ex.labels if x != -100)
    assert n_loss == len(tokenizer("2 + 3 = 5.<|im_end|>5 times 4 is 20.<|im_end|>", add_special_tokens=False)["input_ids"])
    assert ex.labels[0] == -100 and not ex.truncated


def test_last_turn_and_all_tokens_modes(tokenizer):
    from train.data import encode

    assert loss_text(tokenizer, encode(tokenizer, CONVERSATION, "last_turn", 512)) == ["5 times 4 is 20.<|im_end|>"]
    everything = encode(tokenizer, CONVERSATION, "all", 512)
    assert everything.labels[1:] == everything.input_ids[1:]


def test_truncation_is_flagged(tokenizer):
    from train.data import encode

    ex = encode(tokenizer, CONVERSATION, "assistant", max_len=10)
    assert len(ex.input_ids) == 10 and ex.truncated


# --------------------------------------------------------------------------- packing


def test_packed_batch_loss_equals_sum_of_per_example_losses(tiny, tokenizer):
    from train.data import collate, encode, pack
    from train.loop import _forward_loss, _LossPositions, _NoSelect, packing_supported

    model = load_model(tiny).eval()
    convs = [CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "Capital of France?"},
                                               {"role": "assistant", "content": "Paris."}]]
    examples = [encode(tokenizer, c, "assistant", 256) for c in convs]
    labels = [e.labels for e in examples]
    assert packing_supported(model)
    rows = pack([len(e.input_ids) for e in examples], max_len=256)
    assert sorted(i for row in rows for i in row) == [0, 1, 2] and len(rows) == 1
    for select in (_LossPositions(model), _NoSelect()):  # logits at loss positions only, and full logits
        with torch.no_grad():
            packed = _forward_loss(model, collate(rows, examples, labels, packed=True, pad_id=0, row_len=256), select)
            alone = sum(_forward_loss(model, collate([[i]], examples, labels, packed=False, pad_id=0), select)
                        for i in range(3))
        assert float(packed) == pytest.approx(float(alone), abs=1e-5, rel=1e-6)
        if hasattr(select, "remove"):
            select.remove()


def test_packing_fills_rows_without_losing_or_splitting_examples():
    import random

    from train.data import micro_batches, pack

    lengths = [random.Random(i).randint(20, 400) for i in range(5000)]
    rows = pack(lengths, max_len=1024)
    assert sorted(i for row in rows for i in row) == list(range(5000))
    assert all(sum(lengths[i] for i in row) <= 1024 for row in rows)
    assert sum(lengths) / (len(rows) * 1024) > 0.97  # rows come out nearly full
    assert pack([1024, 5, 1024], 1024) == [[0], [2], [1]]
    # packed micro-batches are shuffled, not longest-first
    few = lengths[:400]  # one packing window: its rows come out longest-first
    batches = micro_batches(pack(few, 1024), few, packed=True, max_len=1024, batch_size=2, batch_tokens=None, seed=0)
    longest = [max(few[i] for row in mb for i in row) for mb in batches]
    assert longest != sorted(longest, reverse=True)
    first, last = longest[: len(longest) // 2], longest[len(longest) // 2:]
    assert abs(sum(first) / len(first) - sum(last) / len(last)) < 30


def test_padded_batches_group_similar_lengths_and_respect_the_token_budget():
    from train.data import micro_batches

    lengths = [10, 200, 12, 190, 11, 205, 9, 198]
    batches = micro_batches([[i] for i in range(8)], lengths, packed=False, max_len=256, batch_size=4,
                            batch_tokens=420, seed=0)
    assert sorted(i for b in batches for row in b for i in row) == list(range(8))
    for b in batches:
        longest = max(lengths[row[0]] for row in b)
        assert longest * len(b) <= 420
        assert max(lengths[r[0]] for r in b) - min(lengths[r[0]] for r in b) < 20  # short with short


def test_mixture_weights_set_each_tables_share():
    from train.data import epoch_order

    order = epoch_order([100, 10], [0.5, 0.5], seed=0, epoch=0)
    assert len(order) == 110
    small = [r for t, r in order if t == 1]
    assert len(small) == 55 and set(small) == set(range(10))  # the small table repeated
    assert epoch_order([100, 10], None, 0, 0) != epoch_order([100, 10], None, 0, 1)  # reshuffled per epoch
    assert sorted(epoch_order([3, 2], None, 0, 0)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


# --------------------------------------------------------------------------- goldfish


def test_goldfish_drops_about_one_in_k_the_same_for_the_same_text(tokenizer):
    from train.goldfish import apply_goldfish, dropped_targets

    passage = ("The quick brown fox jumps over the lazy dog while the river runs north past seven old mills, "
               "and every miller counts the sacks of grain twice before the market opens at dawn. ") * 6
    ids = torch.tensor(tokenizer(passage, add_special_tokens=False)["input_ids"])
    text = torch.randint(0, 49152, (20_000,), generator=torch.Generator().manual_seed(0))  # no repeats
    for k in (2, 4, 8):
        assert dropped_targets(text, k=k, h=13).float().mean().item() == pytest.approx(1 / k, abs=0.01)
    # The same passage after two different prefixes: identical drops once h tokens of it are seen.
    a = tokenizer("Intro one. " + passage, add_special_tokens=False)["input_ids"]
    b = tokenizer("A different and longer preface here. " + passage, add_special_tokens=False)["input_ids"]
    tail = len(ids) - 20
    da = dropped_targets(torch.tensor(a), k=4, h=13)[-tail:]
    db = dropped_targets(torch.tensor(b), k=4, h=13)[-tail:]
    assert torch.equal(da, db) and da.any()
    # static: every k-th target from `start`
    assert dropped_targets(ids[:12], k=4, h=13, strategy="static", start=1).nonzero().flatten().tolist() == [1, 5, 9]
    # labels: only loss-bearing targets are dropped, and the count says how many
    labels = [-100] * 10 + a[10:]
    out, dropped = apply_goldfish(a, labels, k=4, h=13)
    assert out[:10] == [-100] * 10 and dropped == sum(1 for x, y in zip(labels, out) if x != y)


def test_goldfish_is_training_only(tiny, tokenizer):
    """The eval loss sees every assistant token: it equals the plain cross-entropy of the model."""
    from train.config import TrainConfig
    from train.data import encode
    from train.loop import Data, _training_labels, evaluate_loss

    examples = [encode(tokenizer, CONVERSATION, "assistant", 256)]
    cfg = TrainConfig(model="m", data="d", goldfish={"k": 2, "h": 2})
    assert _training_labels(cfg, examples)[0] != examples[0].labels  # training drops tokens
    model = load_model(tiny)
    data = Data(examples, _training_labels(cfg, examples), train_idx=[], eval_idx=[0], pad_id=0, packed=False,
                max_len=256)
    got = evaluate_loss(model, [[[0]]], data)
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        expected = model(input_ids=ids, labels=torch.tensor([examples[0].labels])).loss.item()
    assert got == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- NEFTune


def test_neftune_noises_training_forward_only_and_the_hook_goes_away(tiny):
    from train.neftune import neftune

    model = load_model(tiny)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model.eval()
    with torch.no_grad():
        clean = model(input_ids=ids).logits
    with neftune(model, alpha=5.0) as hook:
        hook.set_batch(torch.tensor([[6, 6, 6, 6, 0, 0]]))  # last two positions are padding
        embed = model.get_input_embeddings()
        assert len(embed._forward_hooks) == 1
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, clean)  # eval: bit-identical
            model.train()
            noisy = embed(ids)
            base = embed.weight[ids]
            delta = noisy - base
            assert not torch.equal(noisy, base)
            assert torch.equal(delta[0, 4:], torch.zeros_like(delta[0, 4:]))  # no noise on padding
            bound = 5.0 / (6 * embed.weight.shape[1]) ** 0.5
            assert delta.abs().max() <= bound + 1e-6
            assert not torch.equal(model(input_ids=ids).logits, clean)
    assert len(model.get_input_embeddings()._forward_hooks) == 0


# --------------------------------------------------------------------------- the step, end to end


def train_spec(write_spec, extra: str = "", n: int = 120, families: str = "[arithmetic]") -> Path:
    return write_spec(f"""
name: tr
models: {{tiny: builtin:tiny-llama}}
sources:
  tasks: {{generator: tasks, families: {families}, n: {n}, seed: 0}}
steps:
  sft:
    train:
      model: tiny
      data: tasks
      max_len: 128
      batch_size: 4
{extra}
tracking: {{enabled: false}}
""")


def run(spec: Path, *args):
    from datamill.api import run as dm_run

    return dm_run(spec, *args)


def test_lora_trains_only_adapters_and_the_folder_loads_and_generates(write_spec, cached_models, tiny):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = train_spec(write_spec, "      lora: {r: 4, targets: [q_proj, v_proj]}\n      max_steps: 6\n      lr: 0.01\n")
    result = run(spec)
    record = result.points[-1].steps["sft"]
    assert record.stats["trainable_params"] < record.stats["total_params"] / 10
    base = load_file(str(tiny / "model.safetensors"))
    tuned = load_file(str(record.model_dir / "model.safetensors"))
    assert set(base) == set(tuned)  # merged: a plain HF folder, no adapter names
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)
    model = AutoModelForCausalLM.from_pretrained(record.model_dir)
    tok = AutoTokenizer.from_pretrained(record.model_dir)
    out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 1
    examples = result.table("sft")
    assert set(examples.columns) >= {"id", "table", "split", "tokens", "loss_tokens", "truncated"}
    assert examples.height == 120 and (examples["table"] == "tasks").all()
    log = result.table("sft__log")
    assert log["step"].to_list() == [1, 2, 3, 4, 5, 6]
    assert (record.model_dir.parent / "loss_curve.png").stat().st_size > 1000


def test_adapter_only_saving(write_spec, cached_models):
    from transformers import AutoModelForCausalLM

    spec = train_spec(write_spec, "      lora: {r: 4}\n      save: adapter\n      max_steps: 2\n")
    folder = run(spec).points[-1].steps["sft"].model_dir
    assert (folder / "adapter_config.json").is_file() and not (folder / "config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(folder) is not None  # transformers + peft load it over the base


def test_a_tiny_model_learns_its_task_family(write_spec, cached_models):
    """200 steps on arithmetic lower the eval loss on held-out arithmetic rows (a test that can fail)."""
    spec = train_spec(write_spec, "      max_steps: 200\n      lr: 0.003\n      eval_fraction: 0.1\n"
                                  "      eval_every: 100\n      warmup: 10\n", n=400)
    stats = run(spec).points[-1].steps["sft"].stats
    log = run(spec).table("sft__log")  # cached: the same tables
    evals = [x for x in log["eval_loss"].to_list() if x is not None]
    assert len(evals) == 2
    assert stats["final_eval_loss"] < 0.6 * stats["first_loss"], stats
    assert stats["eval_examples"] == 40 and stats["packing"] is True


def test_spec_errors_for_train(write_spec, cached_models):
    spec = train_spec(write_spec, "      save: adapter\n")
    with pytest.raises(SpecError, match="save: adapter needs lora"):
        run(spec)
    spec = train_spec(write_spec, "      lorra: {r: 4}\n")
    with pytest.raises(SpecError, match="did you mean 'lora'"):
        run(spec)
    spec = train_spec(write_spec, "      eval_data: nothere\n")
    with pytest.raises(SpecError, match="undefined table 'nothere'"):
        run(spec)


def test_rows_that_cannot_train_are_rejected_with_a_reason(write_spec, cached_models):
    spec = write_spec("""
name: rj
models: {tiny: builtin:tiny-llama}
sources:
  rows: {path: rows.jsonl}
steps:
  sft: {train: {model: tiny, data: rows, max_steps: 1, max_len: 40}}
tracking: {enabled: false}
""")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "a question far too long " * 20},
                          {"role": "assistant", "content": "the answer, cut off"}]}]
    (spec.parent / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = run(spec)
    rejected = result.table("sft__rejected")
    assert rejected["reason"].str.contains("no loss-bearing token within max_len=40").to_list() == [True]
    assert result.table("sft").height == 1


def test_train_metrics_and_loss_curve_reach_mlflow(write_spec, cached_models):
    from mlflow import MlflowClient

    spec = train_spec(write_spec, "      max_steps: 3\n      goldfish: {k: 4}\n      neftune: {alpha: 5}\n"
                                  "      log_model: true\n      schedule: constant\n")
    spec.write_text(spec.read_text().replace("tracking: {enabled: false}\n", ""))
    result = run(spec)
    client = MlflowClient(tracking_uri=result.tracking_location)
    run_data = client.get_run(result.run_id).data
    for name in ("sft.loss", "sft.lr", "sft.grad_norm", "sft.loss_tokens_per_s", "sft.useful_token_share",
                 "sft.goldfish_drop_share", "sft.peak_rss_mb"):
        assert name in run_data.metrics, name
    assert len(client.get_metric_history(result.run_id, "sft.loss")) == 3
    assert 0.1 < run_data.metrics["sft.goldfish_drop_share"] < 0.4
    assert run_data.tags["step.sft.data_digests.tasks"]
    artifacts = [a.path for a in client.list_artifacts(result.run_id, "sft")]
    assert "sft/loss_curve.png" in artifacts
    assert "sft/model/model.safetensors" in [a.path for a in client.list_artifacts(result.run_id, "sft/model")]
    lrs = [m.value for m in client.get_metric_history(result.run_id, "sft.lr")]
    assert lrs[-1] == pytest.approx(lrs[0])  # schedule: constant (after a warmup shorter than a step)


# --------------------------------------------------------------------------- kill and resume


def _final_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_kill_and_resume_gives_the_weights_of_an_uninterrupted_run(write_spec, cached_models, model_cache, tmp_path):
    extra = ("      lora: {r: 4, dropout: 0.1}\n      neftune: {alpha: 5}\n      max_steps: 80\n"
             "      checkpoint_every: 5\n      lr: 0.002\n")
    spec = train_spec(write_spec, extra, n=200)
    clean = run(spec).points[-1].steps["sft"]

    other = tmp_path / "killed"
    other.mkdir()
    (other / "spec.yaml").write_text(spec.read_text().replace("name: tr", "name: tr2"))
    env = {**os.environ, "DATAMILL_MODEL_CACHE": str(model_cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "datamill.cli", "--quiet", "run", str(other / "spec.yaml")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = other / ".datamill" / "tr2" / "steps" / ".state"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(state.glob("*/checkpoints/step-*")):
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(state.glob("*/checkpoints/step-*")), "no checkpoint was written before the kill"

    resumed = run(other / "spec.yaml").points[-1].steps["sft"]
    assert resumed.key == clean.key
    assert 0 < resumed.stats["resumed_from_step"] < 80 and clean.stats["resumed_from_step"] == 0
    a, b = _final_weights(clean.model_dir), _final_weights(resumed.model_dir)
    assert set(a) == set(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    assert not list(state.glob("*")), "the state folder is cleaned up once the step is committed"


# --------------------------------------------------------------------------- other ways in


def test_fine_tune_through_the_registry_keeps_per_epoch_states(tiny, tmp_path):
    """What LESS uses: a LoRA warmup with the weights, Adam moments and mean lr of every epoch."""
    from datamill.registry import function

    convs = [[{"role": "user", "content": f"{a} + {a}?"}, {"role": "assistant", "content": str(2 * a)}]
             for a in range(12)]
    result = function("fine_tune")(tiny, convs, tmp_path / "out", state_dir=tmp_path / "state", lora={"r": 4},
                                   epochs=2, batch_size=2, max_len=64, packing="off", epoch_checkpoints=True,
                                   checkpoint_every=None)
    assert [s["epoch"] for s in result["epoch_states"]] == [1, 2]
    assert result["epoch_states"][0]["mean_lr"] > result["epoch_states"][1]["mean_lr"] > 0  # decaying
    state = function("load_epoch_state")(Path(result["epoch_states"][0]["path"]))  # train's own reader
    assert state["moments"] and all("lora_" in name for name in state["moments"])
    assert set(state["moments"]) == set(state["weights"])
    assert (Path(result["model_dir"]) / "config.json").is_file()
    encoded = function("encode_examples")(tiny, convs[:1], max_len=64)
    assert encoded[0].labels.count(-100) < len(encoded[0].labels)


def test_the_loop_runs_as_a_script_for_accelerate_launch(tiny, tokenizer, tmp_path):
    """`accelerate launch -m train.loop JOB.json` runs the same file; here one plain process."""
    import polars as pl

    from train.data import encode
    from train.loop import TrainJob

    examples = [encode(tokenizer, CONVERSATION, "assistant", 128)] * 4
    pl.DataFrame({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples],
                  "truncated": [False] * 4, "table": [0] * 4, "split": ["train"] * 4}).write_parquet(tmp_path / "ex.parquet")
    job = TrainJob(config={"model": str(tiny), "data": "x", "max_steps": 2, "batch_size": 2, "max_len": 128},
                   model_dir=str(tiny), examples=str(tmp_path / "ex.parquet"), out_dir=str(tmp_path / "out"),
                   state_dir=str(tmp_path / "state"))
    job.save(tmp_path / "job.json")
    out = subprocess.run([sys.executable, "-m", "train.loop", str(tmp_path / "job.json")], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 2
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


def _job(tmp_path, tiny, tokenizer, name: str, **config) -> Path:
    import polars as pl

    from train.data import encode
    from train.loop import TrainJob

    convs = [[{"role": "user", "content": f"What is {a} times 3?"}, {"role": "assistant", "content": f"{a * 3}."}]
             for a in range(24)]
    examples = [encode(tokenizer, c, "assistant", 64) for c in convs]
    data = tmp_path / "examples.parquet"
    pl.DataFrame({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples],
                  "truncated": [False] * len(examples), "table": [0] * len(examples),
                  "split": ["train"] * len(examples)}).write_parquet(data)
    job = TrainJob(config={"model": str(tiny), "data": "x", "max_len": 64, "batch_size": 2, "lr": 0.01, **config},
                   model_dir=str(tiny), examples=str(data), out_dir=str(tmp_path / name / "out"),
                   state_dir=str(tmp_path / name / "state"))
    job.save(tmp_path / f"{name}.json")
    return tmp_path / f"{name}.json"


@pytest.mark.slow  # the spec-level launch test below covers the same through `accelerate launch`
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tiny, tokenizer, tmp_path):
    """torchrun (what `accelerate launch` runs) with 2 CPU processes x 2 micro-batches per step
    gives the weights of 1 process x 4: every process knows the plan and the step's token count."""
    settings = {"max_steps": 4, "lora": {"r": 4, "dropout": 0.0}, "packing": "off", "checkpoint_every": None}
    ddp = _job(tmp_path, tiny, tokenizer, "ddp", grad_accum=2, **settings)
    one = _job(tmp_path, tiny, tokenizer, "one", grad_accum=4, **settings)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "train.loop", str(ddp)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run([sys.executable, "-m", "train.loop", str(one)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "out" / "summary.json").read_text())["processes"] == 2
    a = _final_weights(tmp_path / "ddp" / "out" / "model")
    b = _final_weights(tmp_path / "one" / "out" / "model")
    base = _final_weights(tiny)
    assert max(float((a[k] - base[k]).abs().max()) for k in a) > 1e-4  # it trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


@pytest.mark.slow
def test_full_fine_tune_of_smollm2_at_seq_512_fits_in_4_gib(tmp_path):
    """135M parameters, all trained, rows of 512 tokens, a checkpoint on the way: peak RSS < 4 GiB."""
    from datamill.models import resolve_model

    cache = Path(os.environ.get("DATAMILL_MODEL_CACHE", tmp_path / "models"))
    smol = resolve_model("builtin:smollm2-135m-instruct", base_dir=Path("."), cache_dir=cache)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol)
    job = _job(tmp_path, smol, tok, "mem", max_steps=3, checkpoint_every=2, lr=2e-5, loss_on="all")
    config = json.loads(job.read_text())
    config["config"].update(max_len=512, batch_size=2, gradient_checkpointing=True)
    # long rows: every example is a 500-token text
    import polars as pl

    from train.data import encode

    text = " ".join(f"word{i}" for i in range(400))
    ex = encode(tok, text, "all", 512)
    pl.DataFrame({"input_ids": [ex.input_ids] * 8, "labels": [ex.labels] * 8, "truncated": [True] * 8,
                  "table": [0] * 8, "split": ["train"] * 8}).write_parquet(config["examples"])
    job.write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "-m", "train.loop", str(job)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "mem" / "out" / "summary.json").read_text())
    assert summary["trainable_params"] == summary["total_params"] > 130e6
    assert summary["peak_rss_mb"] < 4096, summary


def test_packing_auto_falls_back_to_padded_batches_when_the_model_mixes_packed_examples(tiny, monkeypatch):
    from train import loop
    from train.config import TrainConfig

    model = load_model(tiny)
    monkeypatch.setattr(loop, "packing_supported", lambda model, device=None: False)
    assert loop._use_packing(TrainConfig(model="m", data="d"), model, "cpu") is False
    with pytest.raises(ValueError, match="does not keep packed examples apart"):
        loop._use_packing(TrainConfig(model="m", data="d", packing="on"), model, "cpu")
    assert loop._use_packing(TrainConfig(model="m", data="d", packing="off"), model, "cpu") is False


def test_a_learning_rate_sweep_tokenises_once(write_spec, cached_models):
    spec = train_spec(write_spec, "      max_steps: 2\n      packing: off\n")
    spec.write_text(spec.read_text() + "sweep:\n  steps.sft.train.lr: [0.001, 0.0001]\n")
    result = run(spec)
    keys = {p.steps["sft"].key for p in result.points}
    assert len(keys) == 2  # two models
    assert all(p.steps["sft"].stats["packing"] is False for p in result.points)
    cache = result.workspace.root / "shared" / "train-tokens"
    assert len([t for t in cache.glob("*.parquet") if not t.name.endswith(".rejected.parquet")]) == 1


# --------------------------------------------------------------------------- several processes


# 36 rows in micro-batches of 4: 9 per epoch, steps of 4 + 4 + 1, so in the last step one of two
# processes has no micro-batch of its own (and must still join DDP's all-reduce)
LAUNCH_SETTINGS = "      epochs: 1\n      lora: {r: 4, dropout: 0.0}\n      packing: off\n      lr: 0.01\n"


def _trains_like_one_process(write_spec, launched, launcher: str):
    """The launched run (2 processes x grad_accum 2) took 3 steps and ended with the weights of
    one process x grad_accum 4; its step record."""
    one = run(train_spec(write_spec, LAUNCH_SETTINGS + "      grad_accum: 4\n", n=36))
    record = launched.points[-1].steps["sft"]
    assert record.stats["processes"] == 2 and record.stats["launcher"] == launcher
    assert launched.table("sft__log")["step"].to_list() == [1, 2, 3]
    a, b = _final_weights(record.model_dir), _final_weights(one.points[-1].steps["sft"].model_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    return record


def test_launch_runs_the_step_in_two_processes_with_the_weights_of_one(write_spec, cached_models):
    """`launch: {num_processes: 2}` runs `accelerate launch` (2 CPU processes, gloo) x 2 micro-batches
    per step: the weights of one process x 4 (a last step of one micro-batch included), the
    per-step log in the table and in MLflow."""
    from mlflow import MlflowClient

    spec = train_spec(write_spec, LAUNCH_SETTINGS + "      grad_accum: 2\n      launch: {num_processes: 2}\n", n=36)
    spec.write_text(spec.read_text().replace("tracking: {enabled: false}\n", ""))
    launched = run(spec)
    record = _trains_like_one_process(write_spec, launched, "accelerate")
    client = MlflowClient(tracking_uri=launched.tracking_location)
    assert len(client.get_metric_history(launched.run_id, "sft.loss")) == 3
    assert (record.model_dir.parent / "loss_curve.png").is_file()


def test_a_launch_past_its_timeout_is_stopped_and_the_timeout_is_not_in_the_key(write_spec, cached_models):
    spec = train_spec(write_spec, "      launch: {num_processes: 2, timeout_s: 1}\n", n=10)
    with pytest.raises(StepFailed, match=r"did not finish within launch\.timeout_s = 1 s"):
        run(spec)  # starting two processes alone takes longer than a second
    from datamill.api import plans

    timed = plans(spec)[0].by_name("sft").key
    untimed = train_spec(write_spec, "      launch: {num_processes: 2}\n", n=10)  # the same file, rewritten
    assert plans(untimed)[0].by_name("sft").key == timed


def test_launch_errors_name_the_field_or_show_the_processes_output(write_spec, cached_models):

    spec = train_spec(write_spec, "      launch: {num_processes: 2, config_file: nowhere.yaml}\n", n=10)
    with pytest.raises(SpecError, match=r"launch\.config_file.*not found"):
        run(spec)
    # a bad Accelerate config: the processes fail and the error carries their last lines
    spec.parent.joinpath("bad.yaml").write_text("distributed_type: NOT_A_TYPE\n")
    spec = train_spec(write_spec, "      max_steps: 1\n      launch: {num_processes: 2, config_file: bad.yaml}\n",
                      n=10)
    with pytest.raises(StepFailed, match=r"(?s)accelerate launch.*failed.*NOT_A_TYPE"):
        run(spec)


@pytest.mark.slow
def test_launch_on_a_ray_executor_trains_as_ray_train_workers(write_spec, cached_models):
    """executor: ray runs `launch` as Ray Train workers (TorchTrainer; gloo on the CPU): the same
    weights as one process with the same global batch."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        spec = train_spec(write_spec, LAUNCH_SETTINGS + "      grad_accum: 2\n      launch: {num_processes: 2}\n",
                          n=36)
        spec.write_text(spec.read_text() + "executor: {kind: ray}\n")
        launched = run(spec)
        # an FSDP/DeepSpeed config that Ray Train would not use is an error, not silently DDP
        spec.parent.joinpath("fsdp.yaml").write_text("distributed_type: FSDP\n")
        spec.write_text(spec.read_text().replace("launch: {num_processes: 2}",
                                                  "launch: {num_processes: 2, config_file: fsdp.yaml}"))
        with pytest.raises(StepFailed, match="not used by Ray Train"):
            run(spec)
    finally:
        ray.shutdown()
    _trains_like_one_process(write_spec, launched, "ray-train")


def test_the_live_log_of_launched_processes_is_followed_as_it_grows(tmp_path):
    """The launching process reads the processes' live log while they run (progress, MLflow
    metrics as they come): a half-written line waits, nothing is missed at the end."""
    from train.launch import following

    path, seen = tmp_path / "live.jsonl", []
    path.write_text("stale line of a killed attempt\n")
    with following(path, lambda total, start: seen.append(("header", total, start)),
                   lambda step, metrics: seen.append((step, metrics["loss"])), every_s=0.05):
        path.write_text('{"total_steps": 3, "start_step": 1}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen == [("header", 3, 1), (2, 1.5)]  # read while the block runs; the torn line not yet
        with open(path, "a") as f:
            f.write('ss": 0.5}\n')
    assert seen == [("header", 3, 1), (2, 1.5), (3, 0.5)]
