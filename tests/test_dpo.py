"""Preference objectives in the trainer: DPO equals TRL's DPOTrainer, resume, reference, IPO/SimPO, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import torch  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    import os

    from datamill.models import resolve_model

    # the session's model cache (tests/conftest.py): built once for every module that uses it
    return resolve_model("builtin:tiny-llama", base_dir=Path("."), cache_dir=Path(os.environ["DATAMILL_MODEL_CACHE"]))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


def load_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def pair_rows(n: int = 6) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {a} times 3?"}],
             "chosen": [{"role": "assistant", "content": f"{a * 3}."}],
             "rejected": [{"role": "assistant", "content": f"It is {a * 3 + 1}, I think."}]} for a in range(n)]


@pytest.fixture
def fresh_accelerate():
    """TRL's trainer sets Accelerate's process-wide state (its own mixed precision): reset it after,
    so the next test's Accelerator starts clean."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_dpo_loss_and_gradients_equal_trls_dpo_trainer(tiny, tokenizer, tmp_path, fresh_accelerate):
    """Same batch (TRL's own tokenisation), same initial weights: TRL's DPOTrainer.compute_loss
    and our path (collate -> sequence_logps -> pair_losses, mean over pairs) give the same loss
    and the same gradient on every parameter."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from train.data import Example, collate
    from train.loop import _LossPositions
    from train.preference import disable_dropout, pair_losses, sequence_logps

    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, beta=0.1, report_to=[],
                     use_cpu=True, max_length=64, logging_steps=1, precompute_ref_log_probs=True)
    trainer = DPOTrainer(model=load_model(tiny), args=args, train_dataset=Dataset.from_list(pair_rows(4)),
                         processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))

    # TRL's rows are [chosen_0..3, rejected_0..3]; ours alternate chosen, rejected.
    pairs = batch["input_ids"].shape[0] // 2
    examples = []
    for j in range(pairs):
        for row in (j, j + pairs):
            keep = batch["attention_mask"][row].bool()
            ids = batch["input_ids"][row][keep].tolist()
            mask = batch["completion_mask"][row][keep].tolist()
            examples.append(Example(ids, [t if m else -100 for t, m in zip(ids, mask)], False))
    model = load_model(tiny)
    disable_dropout(model)
    select = _LossPositions(model)
    tensors = collate([[i] for i in range(len(examples))], examples, [e.labels for e in examples], packed=False,
                      pad_id=0)
    model.eval()
    with torch.no_grad():  # the reference: the initial weights, as both sides use it
        reference, _ = sequence_logps(model, tensors, select)
    model.train()
    logps, counts = sequence_logps(model, tensors, select)
    losses, rewards_c, rewards_r = pair_losses("dpo", 0.1, 0.5, logps, counts, reference)
    loss = losses.mean()
    loss.backward()

    # TRL's loss on the same batch and the same reference log-probs (its precomputed-reference input)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = reference[0::2], reference[1::2]
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    assert abs(float(loss.detach()) - float(trl_loss.detach())) < 1e-6
    ours = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ours) == set(trl_grads)
    worst = max(float((ours[n] - trl_grads[n]).abs().max()) for n in ours)
    assert worst < 1e-6, worst
    assert max(float(g.abs().max()) for g in ours.values()) > 1e-4  # the gradients are not all ~0


def test_pair_losses_match_their_formulas():
    from train.preference import pair_losses

    logps = torch.tensor([-4.0, -6.0, -3.0, -2.5])  # chosen, rejected, chosen, rejected
    counts = torch.tensor([2.0, 3.0, 1.0, 5.0])
    ref = torch.tensor([-5.0, -5.0, -3.0, -3.0])
    beta = 0.1
    dpo, rc, rr = pair_losses("dpo", beta, 0.5, logps, counts, ref)
    delta = torch.tensor([(-4 + 5) - (-6 + 5), (-3 + 3) - (-2.5 + 3)])
    assert torch.allclose(dpo, -torch.nn.functional.logsigmoid(beta * delta))
    assert torch.allclose(rc, beta * torch.tensor([1.0, 0.0])) and torch.allclose(rr, beta * torch.tensor([-1.0, 0.5]))
    ipo, _, _ = pair_losses("ipo", beta, 0.5, logps, counts, ref)
    expect = torch.tensor([(1 / 2 - (-1) / 3 - 5.0) ** 2, (0 / 1 - 0.5 / 5 - 5.0) ** 2])
    assert torch.allclose(ipo, expect)
    simpo, _, _ = pair_losses("simpo", 2.0, 0.5, logps, counts)
    expect = -torch.nn.functional.logsigmoid(2.0 * torch.tensor([-4 / 2 - -6 / 3, -3 / 1 - -2.5 / 5]) - 0.5)
    assert torch.allclose(simpo, expect)


def _pairs_parquet(tokenizer, path: Path, n: int = 12, held_out: int = 2) -> Path:
    import polars as pl

    from train.data import encode_completion

    rows = []
    for k, row in enumerate(pair_rows(n)):
        for side in ("chosen", "rejected"):
            ex = encode_completion(tokenizer, row["prompt"], row[side], 64)
            rows.append({"input_ids": ex.input_ids, "labels": ex.labels, "truncated": False, "table": 0,
                         "split": "eval" if k >= n - held_out else "train"})
    pl.DataFrame(rows).write_parquet(path)
    return path


def _run(tiny, examples: Path, out: Path, state: Path, **config) -> dict:
    from train.loop import TrainJob, train

    settings = {"model": str(tiny), "data": "x", "objective": "dpo", "max_len": 64, "batch_size": 2, "lr": 0.01,
                "max_steps": 4, "checkpoint_every": 2, **config}
    return train(TrainJob(config=settings, model_dir=str(tiny), examples=str(examples), out_dir=str(out),
                          state_dir=str(state)))


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / "model.safetensors"))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_dpo_resumes_to_identical_weights_and_reuses_the_reference(tiny, tokenizer, tmp_path, lora, monkeypatch):
    """A run, then the same job from its step-2 checkpoint: the same final weights, and the
    reference log-probs are read back, not recomputed. Step 1's loss is log 2: the policy starts
    as its reference."""
    from train import preference

    examples = _pairs_parquet(tokenizer, tmp_path / "pairs.parquet")
    extra = {"lora": {"r": 4}} if lora else {}
    first = _run(tiny, examples, tmp_path / "a", tmp_path / "state", **extra)
    assert abs(first["first_loss"] - 0.693147) < 1e-4
    assert first["train_pairs"] == 10 and first["eval_pairs"] == 2
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert key in log[-1]
    assert "eval_rewards/accuracies" in log[-1]
    assert (tmp_path / "state" / preference.REFERENCE_FILE).is_file()

    calls = []
    monkeypatch.setattr(preference, "sequence_logps", _counting(preference.sequence_logps, calls))
    resumed = _run(tiny, examples, tmp_path / "b", tmp_path / "state", **extra)
    assert resumed["resumed_from_step"] == 2
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    # the resumed run scored only its own steps and evals: no reference pass over all 12 pairs
    assert len(calls) <= 2 * 2 + 1
    base = _weights_of(tiny)
    assert max(float((a[k] - base[k]).abs().max()) for k in a if k in base) > 1e-5  # it trained


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapped


def _weights_of(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_lora_reference_is_the_base_with_adapters_off_and_no_second_model(tiny, tokenizer, tmp_path, monkeypatch):
    """With LoRA the reference log-probs equal the base model's own, and the base is loaded once."""
    import transformers

    from train.data import collate
    from train.loop import _load_examples, _NoSelect
    from train.preference import REFERENCE_FILE, sequence_logps

    loads = []
    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(a) or original(*a, **k))
    examples_file = _pairs_parquet(tokenizer, tmp_path / "pairs.parquet", n=4, held_out=0)
    # a non-zero adapter from the start would change the policy but must not change the reference
    _run(tiny, examples_file, tmp_path / "out", tmp_path / "state", lora={"r": 4}, max_steps=1)
    assert len(loads) == 1
    reference = torch.load(tmp_path / "state" / REFERENCE_FILE)
    examples, _, _ = _load_examples(str(examples_file))
    monkeypatch.undo()
    base = load_model(tiny).eval()
    with torch.no_grad():
        expect, _ = sequence_logps(base, collate([[i] for i in range(len(examples))], examples,
                                                 [e.labels for e in examples], packed=False, pad_id=0), _NoSelect())
    assert torch.allclose(reference.float(), expect, atol=1e-4)


def test_packed_pairs_give_the_padded_result(tiny, tokenizer, tmp_path):
    """Packing (whole pairs side by side in rows, restarting position ids) is exact: one step over
    every pair gives the weights that padded batches give."""
    examples = _pairs_parquet(tokenizer, tmp_path / "pairs.parquet", held_out=0)
    settings = {"batch_size": 64, "max_steps": 1, "max_len": 128, "checkpoint_every": None}
    packed = _run(tiny, examples, tmp_path / "p", tmp_path / "sp", packing="on", **settings)
    padded = _run(tiny, examples, tmp_path / "u", tmp_path / "su", packing="off", **settings)
    assert packed["packing"] and not padded["packing"]
    a, b = _weights(tmp_path / "p"), _weights(tmp_path / "u")
    base = _weights_of(tiny)
    assert max(float((a[k] - base[k]).abs().max()) for k in a if k in base) > 5e-3  # it moved by ~lr
    # Adam's first step is ~lr * sign(g): float noise in near-zero gradients shows at 1e-5 here, a
    # mixed-up pair would show at lr (1e-2)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


@pytest.mark.parametrize("objective", ["ipo", "simpo"])
def test_ipo_and_simpo_train_on_the_same_path(tiny, tokenizer, tmp_path, objective):
    from train.preference import REFERENCE_FILE

    examples = _pairs_parquet(tokenizer, tmp_path / "pairs.parquet")
    summary = _run(tiny, examples, tmp_path / "out", tmp_path / "state", objective=objective, max_steps=3,
                   checkpoint_every=None)
    assert summary["objective"] == objective and summary["steps"] == 3
    assert summary["final_loss"] == summary["final_loss"]  # not NaN
    assert (tmp_path / "state" / REFERENCE_FILE).is_file() == (objective != "simpo")


def test_preference_settings_are_checked():
    from pydantic import ValidationError

    from train.config import TrainConfig

    with pytest.raises(ValidationError, match="goldfish is an SFT loss"):
        TrainConfig(model="m", data="d", objective="dpo", goldfish=True)
    with pytest.raises(ValidationError, match="simpo uses no reference"):
        TrainConfig(model="m", data="d", objective="simpo", reference="other")
    with pytest.raises(ValidationError, match="apply to preference objectives"):
        TrainConfig(model="m", data="d", beta=0.2)
    assert TrainConfig(model="m", data="d", objective="dpo").preference_beta() == 0.1
    assert TrainConfig(model="m", data="d", objective="simpo").preference_beta() == 2.0


def test_unusable_pairs_are_rejected_with_a_reason():
    """The train step keeps a pair it cannot learn from out, with the reason in `<step>__rejected`."""
    from train.step import _unusable_pair

    prompt = [{"role": "user", "content": "2 + 2?"}]
    same = [{"role": "assistant", "content": "4"}]
    assert "identical" in _unusable_pair(prompt, same, [dict(same[0])])
    assert "empty" in _unusable_pair(prompt, same, [])
    assert "no assistant turn" in _unusable_pair(prompt, same, [{"role": "user", "content": "5"}])
    assert _unusable_pair(prompt, same, [{"role": "assistant", "content": "5"}]) is None


@pytest.mark.slow
def test_dpo_on_two_processes_equals_one_with_the_same_global_batch(tiny, tokenizer, tmp_path):
    """torchrun with 2 CPU processes x 2 micro-batches per step gives the weights of 1 process x 4:
    the reference log-probs are computed in shares and read back by both, the loss is the mean
    over the whole step's pairs."""
    import os
    import subprocess
    import sys

    from train.loop import TrainJob

    examples = _pairs_parquet(tokenizer, tmp_path / "pairs.parquet", n=16, held_out=0)
    settings = {"model": str(tiny), "data": "x", "objective": "dpo", "max_len": 64, "batch_size": 1, "lr": 0.01,
                "max_steps": 3, "packing": "off", "checkpoint_every": None, "lora": {"r": 4, "dropout": 0.0}}
    jobs = {}
    for name, accum in (("ddp", 2), ("one", 4)):
        job = TrainJob(config={**settings, "grad_accum": accum}, model_dir=str(tiny), examples=str(examples),
                       out_dir=str(tmp_path / name / "out"), state_dir=str(tmp_path / name / "state"))
        job.save(tmp_path / f"{name}.json")
        jobs[name] = tmp_path / f"{name}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parent.parent
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "train.loop", str(jobs["ddp"])], cwd=root,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run([sys.executable, "-m", "train.loop", str(jobs["one"])], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "out" / "summary.json").read_text())["processes"] == 2
    a, b = _weights(tmp_path / "ddp" / "out"), _weights(tmp_path / "one" / "out")
    base = _weights_of(tiny)
    assert max(float((a[k] - base[k]).abs().max()) for k in a if k in base) > 1e-4  # it trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
