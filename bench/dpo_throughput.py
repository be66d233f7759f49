"""DPO training throughput: datamill's trainer next to TRL's DPOTrainer, tokens/s.

SmolLM2-135M-Instruct with LoRA (r=8, alpha 16, dropout 0.05 on q,k,v,o), fp32 on the CPU, one
epoch over the same preference pairs, the same number of pairs per optimizer step. Runs:
  datamill          train.loop.train with objective: dpo and its default packing (auto: whole
                    pairs side by side in rows of 2 x max_len, position ids restarting per side),
                    logits only at completion positions, reference log-probs computed once
                    before step 1 (LoRA: the model with its adapters off);
  datamill, unpacked  the same with packing: off (pairs of similar lengths batched, padded);
  TRL               trl.DPOTrainer with its defaults: chosen and rejected concatenated into one
                    padded batch, and with LoRA the reference is the model with adapters disabled,
                    run as a no-grad forward on every step (precompute_ref_log_probs=False);
  TRL, precomputed  the same with precompute_ref_log_probs=True (one reference pass over the data
                    set at construction, like datamill).

Data: preference pairs made from the offline task families (datagen.tasks.generate_tasks, all
seven, easy/medium/hard in turn): prompt = the row's user turn; chosen = its correct reply,
rejected = the reply with a wrong option from the row's `choices` in place of the answer (chat
rows: another reply); about 70% of the pairs wrap both in one to three more sentences, so
completions run from a few tokens to ~90. Each trainer tokenises the same pairs its own way:
TRL renders the prompt with the generation prompt and takes the rest of prompt+completion as the
completion (which includes the template's newline after <|im_end|>); datamill uses
train.data.encode_completion (labels on the assistant turn and its end-of-turn token). Their
token counts are reported side by side.

Equalised: the pairs and their order's randomness (seed), pairs per optimizer step (TRL:
per_device_train_batch_size; datamill unpacked: batch_size; datamill packed: one row of
2 x max_len per step, max_len chosen so that the epoch has as many steps as TRL's), grad_accum 1,
lr 5e-5 cosine without warmup, AdamW betas (0.9, 0.999) eps 1e-8, weight decay 0, grad-norm clip
1.0, beta 0.1, sigmoid loss, max length per side (no side is truncated), no gradient
checkpointing, dropout off (TRL's disable_dropout default; datamill does the same for preference
objectives), fp32, seed 0.

Timing, as bench/train_throughput.py (whose helpers this script imports): every run in a fresh
process, the clock read at the end of every optimizer step (datamill: its per-step log callback;
TRL: a TrainerCallback's on_step_end), the first --warmup steps not timed, the machine's other
load measured from /proc/stat, a disturbed run rerun once. Rate = the epoch's tokens / (mean
timed step time x steps). One-off reference passes (datamill's, TRL's precompute) are timed
separately and added to the epoch for the "end to end" figure; model loading and tokenisation
are in neither.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python bench/dpo_throughput.py          (writes
      bench/dpo_throughput.json and .md; 17 min with 1 torch thread while other work held a core,
      an estimated 6-8 min on an idle 2-core machine)
      .venv/bin/python bench/dpo_throughput.py --quick                   (fewer pairs; prints only)
Needs the `bench` extra (trl; written against trl 1.16). Offline: the model is a builtin, built once
into the model cache (DATAMILL_MODEL_CACHE, else ~/.cache/datamill/models).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import train_throughput as tt  # noqa: E402  (bench/train_throughput.py: timing, load, machine helpers)

MODEL = "builtin:smollm2-135m-instruct"
LORA, SEED = tt.LORA, tt.SEED
LR, BETA = 5e-5, 0.1
RUNS = {  # name: (trainer, option)
    "datamill": ("datamill", "auto"),
    "datamill-unpacked": ("datamill", "off"),
    "trl": ("trl", False),
    "trl-precomputed": ("trl", True),
}
LABELS = {"datamill": "datamill (packing auto)", "datamill-unpacked": "datamill (packing off)",
          "trl": "TRL DPOTrainer (reference every step)",
          "trl-precomputed": "TRL DPOTrainer (precompute_ref_log_probs)"}

OPENERS = ["Sure.", "Of course!", "Good question.", "Here is the answer.", "Let me help with that.", "Happy to help."]
CHOSEN_MORE = [
    "I worked through it step by step and checked the result against the question before answering.",
    "The key is to read the question carefully and apply the rule exactly as stated, without skipping a step.",
    "If you want, I can walk you through the reasoning in more detail or give a similar example to practise on.",
    "A quick sanity check confirms it: putting the answer back into the question gives a consistent result.",
    "This kind of question comes up often, so it is worth remembering the method rather than just the answer.",
]
REJECTED_MORE = [
    "I answered from memory rather than working it out, so there may be a small slip somewhere.",
    "It is roughly what you would expect at a glance, although I did not double-check every detail.",
    "Questions like this are easy to get slightly wrong, but this should be close enough for most purposes.",
    "I skipped the careful check this time, since the answer looked obvious from the way the question was put.",
    "Let me know if this does not match what you expected and I can take another look at it.",
]


# --------------------------------------------------------------------------- data


def make_pairs(n: int, seed: int = SEED) -> list[dict]:
    """n conversational preference pairs (prompt, chosen, rejected), deterministic in (n, seed)."""
    from datagen.tasks import generate_tasks

    by_level = [generate_tasks(None, n, seed, d) for d in ("easy", "medium", "hard")]
    rng = random.Random(f"dpo-throughput:{seed}")
    pairs = []
    for i in range(n):
        row = by_level[i % 3][i]
        user, reply = row["messages"][0], row["messages"][1]["content"]
        wrong = rng.choice([c for c in row["choices"] if c != row["answer"]])
        wrong_reply = reply.replace(row["answer"], wrong) if row["answer"] in reply else wrong
        if rng.random() < 0.3:  # short: the bare replies
            chosen, rejected = reply, wrong_reply
        else:
            def wrap(text: str, more: list[str]) -> str:
                end = "" if text.rstrip()[-1:] in ".!?" else "."
                return " ".join([rng.choice(OPENERS), text + end, *rng.sample(more, rng.randint(1, 3))])

            chosen, rejected = wrap(reply, CHOSEN_MORE), wrap(wrong_reply, REJECTED_MORE)
        pairs.append({"prompt": [user], "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}], "family": row["family"]})
    return pairs


def _packed_rows(lengths: list[int], max_len: int) -> int:
    """Packed rows (of 2 x max_len) of datamill's DPO epoch, by its own planner."""
    from train.data import pair_batches

    return len(pair_batches(list(range(len(lengths) // 2)), lengths, packed=True, max_len=max_len, batch_size=1,
                            batch_tokens=None, seed=SEED))


def _trl_tokens(tokenizer, pair: dict) -> dict:
    """What TRL's DPOTrainer makes of a pair (its tokenize_fn, for counting): prompt, chosen, rejected ids."""
    def ids(messages, gen=False):
        return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=True)[
            "input_ids"]

    prompt = ids(pair["prompt"], gen=True)
    full_c, full_r = ids(pair["prompt"] + pair["chosen"]), ids(pair["prompt"] + pair["rejected"])
    assert full_c[:len(prompt)] == prompt and full_r[:len(prompt)] == prompt
    return {"prompt": len(prompt), "chosen": len(full_c) - len(prompt), "rejected": len(full_r) - len(prompt)}


def build_data(folder: Path, n_pairs: int, pairs_per_step: int, work: Path) -> dict:
    """The pairs as datamill's examples parquet (rows 2p, 2p+1) and as TRL's JSON rows, with both
    sides' token counts, and the max_len that packs datamill's epoch into as many steps as TRL's."""
    import math

    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from train.data import encode_completion

    tokenizer = AutoTokenizer.from_pretrained(folder)
    pairs = make_pairs(n_pairs)
    examples = [encode_completion(tokenizer, p["prompt"], p[side], 4096) for p in pairs
                for side in ("chosen", "rejected")]
    lengths = [len(e.input_ids) for e in examples]
    steps = math.ceil(n_pairs / pairs_per_step)
    max_len = -(-max(lengths) // 8) * 8
    while _packed_rows(lengths, max_len) > steps:
        max_len += 8
    path = work / "pairs.parquet"
    pq.write_table(pa.table({
        "input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples],
        "truncated": [e.truncated for e in examples], "table": pa.array([0] * len(examples), pa.int64()),
        "split": ["train"] * len(examples)}), path)
    trl_path = work / "pairs.json"
    trl_path.write_text(json.dumps([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]))
    trl = [_trl_tokens(tokenizer, p) for p in pairs]
    dm_completion = [sum(1 for x in e.labels[1:] if x != -100) for e in examples]
    completion_lens = [c for t in trl for c in (t["chosen"], t["rejected"])]
    return {"path": str(path), "trl_path": str(trl_path), "pairs": n_pairs, "steps": steps, "max_len": max_len,
            "families": sorted({p["family"] for p in pairs}),
            "datamill_tokens": sum(lengths), "datamill_completion_tokens": sum(dm_completion),
            "trl_tokens": sum(t["prompt"] * 2 + t["chosen"] + t["rejected"] for t in trl),
            "trl_completion_tokens": sum(completion_lens),
            "mean_side_len": round(sum(lengths) / len(lengths), 1), "longest_side": max(lengths),
            "completion_len_min_median_max": [min(dm_completion), statistics.median(dm_completion),
                                              max(dm_completion)],
            "datamill_packed_rows": _packed_rows(lengths, max_len)}


# --------------------------------------------------------------------------- workers (one process each)


def run_datamill(job: dict) -> dict:
    import torch

    from datamill import progress
    from train import preference

    torch.set_num_threads(job["threads"])
    progress.set_quiet(True)
    work = Path(tempfile.mkdtemp(prefix="datamill-", dir=job["work"]))
    config = {"model": job["model_dir"], "data": "x", "objective": "dpo", "beta": BETA, "checkpoint_every": None,
              "packing": job["option"], "lora": LORA,
              "batch_size": 1 if job["option"] == "auto" else job["pairs_per_step"],
              "grad_accum": 1, "max_len": job["max_len"], "epochs": 1.0, "lr": LR, "schedule": "cosine", "warmup": 0,
              "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": SEED, "log_every": 1, "precision": "fp32",
              "device": "cpu"}
    reference = {}
    original = preference.reference_logps

    def timed_reference(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            reference["seconds"] = time.perf_counter() - started

    preference.reference_logps = timed_reference  # train.loop imports it from the module at call time
    out = tt.timed_datamill_epoch(job, config, work)
    logged = out.pop("logged")
    del out["summary"]
    return out | {"reference_seconds": round(reference["seconds"], 2),
                  "mean_train_loss": round(statistics.mean(m["loss"] for m in logged), 4),
                  "losses": [round(m["loss"], 4) for m in logged]}


def run_trl(job: dict) -> dict:
    """TRL's DPOTrainer inside train_throughput's HF-family runner (its clock callback and counting
    mixin). The mixin counts `labels` != -100: a wrapper on the collator adds them (the completion
    mask) and the trainer drops them again before DPOTrainer sees the batch."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    info = {}

    class TimedDPO(DPOTrainer):
        def _precompute_ref_logps(self, *args, **kwargs):
            started = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            info["reference_seconds"] = round(info.get("reference_seconds", 0.0) + time.perf_counter() - started, 2)
            return out

        def compute_loss(self, model, inputs, *args, **kwargs):
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            return super().compute_loss(model, inputs, *args, **kwargs)

    def make(cls, model, tokenizer, clock, cuda):
        args = DPOConfig(per_device_train_batch_size=job["pairs_per_step"], max_length=job["max_len"], beta=BETA,
                         loss_type=["sigmoid"], precompute_ref_log_probs=job["option"], logging_steps=1,
                         **tt._training_args(job, cuda))
        rows = json.loads(Path(job["trl_examples"]).read_text())
        trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      callbacks=[clock], peft_config=tt._peft_config())
        collate = trainer.data_collator

        def with_labels(examples):
            batch = collate(examples)
            batch["labels"] = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            return batch

        trainer.data_collator = with_labels
        info.update(precompute_ref_log_probs=args.precompute_ref_log_probs, disable_dropout=args.disable_dropout,
                    gradient_checkpointing=args.gradient_checkpointing, padding_free=args.padding_free)
        return trainer, str(getattr(args.optim, "value", args.optim))

    return tt._run_hf_family(job, TimedDPO, make) | info


WORKERS = {"datamill": run_datamill, "trl": run_trl}


def worker_main(job_path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    job = json.loads(Path(job_path).read_text())
    Path(job["result"]).write_text(json.dumps(WORKERS[job["trainer"]](job)))


# --------------------------------------------------------------------------- the driver


def run_worker(job: dict, work: Path, args) -> dict:
    """One run in a fresh process, measured by train_throughput's `measure`."""
    job_path = work / f"{job['run']}-job.json"
    job_path.write_text(json.dumps(job))
    started = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path)], check=True,
                   cwd=str(work))
    raw = json.loads(Path(job["result"]).read_text())
    r = tt.measure(raw, args.warmup, args.threads, None)
    r.update({k: v for k, v in raw.items() if k != "steps"})
    r["process_seconds"] = round(time.perf_counter() - started, 1)
    r["pairs_per_step"] = round(r["epoch_examples"] / 2 / r["steps"], 2)
    ref = r.get("reference_seconds") or 0.0
    r["end_to_end_seconds"] = round(r["epoch_seconds_est"] + ref, 1)
    r["end_to_end_loss_tokens_per_s"] = round(r["epoch_loss_tokens"] / r["end_to_end_seconds"], 1)
    r["end_to_end_tokens_per_s"] = round(r["epoch_tokens"] / r["end_to_end_seconds"], 1)
    return r


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--pairs", type=int, help="preference pairs in the epoch (default 48; --quick: 24)")
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="24 pairs, datamill and TRL only; prints only")
    tt.add_run_options(parser, "bench/dpo_throughput", max_wait=45)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the clock starts at the end of a step)")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if args.quick:
        runs = [r for r in runs if r in ("datamill", "trl")]
    args.pairs = args.pairs or (24 if args.quick else 48)
    for r in runs:
        if r not in RUNS:
            parser.error(f"unknown run {r!r}; valid: {', '.join(RUNS)}")

    from datamill.models import resolve_model

    out = args.out or (None if args.quick else str(ROOT / "bench" / "dpo_throughput"))
    work = Path(tempfile.mkdtemp(prefix="dpo-throughput-"))
    began, load_before = time.perf_counter(), os.getloadavg()[0]
    folder = resolve_model(MODEL, base_dir=ROOT, cache_dir=Path(args.cache_dir))
    data = build_data(folder, args.pairs, args.pairs_per_step, work)
    print(f"{data['pairs']} pairs, {args.pairs_per_step} per step ({data['steps']} steps), max_len {data['max_len']}; "
          f"datamill {data['datamill_completion_tokens']}/{data['datamill_tokens']} completion/all tokens, "
          f"TRL {data['trl_completion_tokens']}/{data['trl_tokens']}", flush=True)
    results = {}
    for name in runs:
        trainer, option = RUNS[name]
        job = {"run": name, "trainer": trainer, "option": option, "model_dir": str(folder), "examples": data["path"],
               "trl_examples": data["trl_path"], "max_len": data["max_len"], "pairs_per_step": args.pairs_per_step,
               "lr": LR, "threads": args.threads, "mode": "lora", "work": str(work),
               "result": str(work / f"{name}.json")}
        attempts = []
        for _ in range(1 + args.retries):
            waited = tt.wait_quiet(args.max_wait) if args.max_wait > 0 else 0.0
            r = run_worker(job, work, args) | {"waited_for_quiet_s": waited}
            attempts.append(r)
            print(f"  {name:18s} {r['loss_tokens_per_s']:7.1f} completion tok/s {r['tokens_per_s']:7.1f} tok/s  "
                  f"{r['steps']} steps x {r['s_per_step']:.3f} s  reference {r.get('reference_seconds') or 0:.1f} s  "
                  f"other load {r['other_load']:.2f} cores  ({r['process_seconds']} s)", flush=True)
            if r["other_load"] <= args.max_other_load:
                break
        best = min(attempts, key=lambda a: a["other_load"])
        if len(attempts) > 1:
            best["attempts"] = [{k: a[k] for k in ("loss_tokens_per_s", "other_load", "s_per_step")} for a in attempts]
        results[name] = best
    ratios = {}
    for ours in ("datamill", "datamill-unpacked"):
        for peer in ("trl", "trl-precomputed"):
            if ours in results and peer in results:
                a, b = results[ours], results[peer]
                ratios[f"{ours}/{peer}"] = {
                    "completion_tokens_per_s": round(a["loss_tokens_per_s"] / b["loss_tokens_per_s"], 2),
                    "tokens_per_s": round(a["tokens_per_s"] / b["tokens_per_s"], 2),
                    "epoch_time": round(b["epoch_seconds_est"] / a["epoch_seconds_est"], 2),
                    "end_to_end_time": round(b["end_to_end_seconds"] / a["end_to_end_seconds"], 2)}
    command = " ".join(["HF_HUB_OFFLINE=1 .venv/bin/python bench/dpo_throughput.py", *argv])
    result = {"what": "DPO training tokens per second (completion tokens and all tokens): one epoch over the same "
                      "preference pairs, epoch time = mean timed step time x steps; one-off reference passes timed "
                      "separately ('end to end' = epoch + reference pass)",
              "goal": {"datamill/trl": 1.0}, "command": command, "total_seconds": round(time.perf_counter() - began, 1),
              "max_other_load": args.max_other_load, "retries": args.retries,
              "machine": tt.machine_info(args.threads) | {"load_avg_1m_before": round(load_before, 2),
                                                           "load_avg_1m_after": round(os.getloadavg()[0], 2)},
              "setup": {"model": MODEL, "lora": LORA, "precision": "fp32", "lr": LR, "schedule": "cosine, no warmup",
                        "beta": BETA, "loss": "sigmoid", "pairs_per_step": args.pairs_per_step,
                        "warmup_steps": args.warmup, "seed": SEED,
                        "data": {k: v for k, v in data.items() if not k.endswith("path")}},
              "runs": results, "ratios": ratios}
    shutil.rmtree(work, ignore_errors=True)
    text = markdown(result)
    print(text)
    if out:
        Path(out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(out + ".md").write_text(text)


def markdown(result: dict) -> str:
    m, s, d = result["machine"], result["setup"], result["setup"]["data"]
    runs, ratios = result["runs"], result["ratios"]
    head_ratio = ratios.get("datamill/trl", {}).get("completion_tokens_per_s")
    lines = [f"# DPO training throughput: datamill vs TRL DPOTrainer ({m['cpu']}, {m['cores']} cores, "
             f"{m['torch_threads']} torch threads)", "",
             f"torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, accelerate {m['accelerate']}, "
             f"peft {m['peft']}, Python {m['python']}, {m['system']}, {m['date']}. 1-minute load average "
             f"{m['load_avg_1m_before']} before, {m['load_avg_1m_after']} after; "
             f"whole run {result['total_seconds']} s.",
             "", f"Headline: datamill / TRL (its defaults) = **{head_ratio}x** in completion tokens/s over the "
             f"epoch (goal >= {result['goal']['datamill/trl']}x).", "",
             "| run | completion tok/s | all tok/s | steps | s/step | pairs/step | padding | reference pass s "
             "| end-to-end s | end-to-end completion tok/s | other load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {LABELS[name]} | {r['loss_tokens_per_s']} | {r['tokens_per_s']} | {r['steps']} | "
                     f"{r['s_per_step']} | {r['pairs_per_step']} | {r['padding_share']:.0%} | "
                     f"{r.get('reference_seconds') or '-'} | {r['end_to_end_seconds']} | "
                     f"{r['end_to_end_loss_tokens_per_s']} | {r['other_load']} |")
    lines += ["", "| ratio | completion tok/s | all tok/s | epoch time | end-to-end time |", "|---|---|---|---|---|"]
    for key, v in ratios.items():
        lines.append(f"| {key} | **{v['completion_tokens_per_s']}x** | {v['tokens_per_s']}x | {v['epoch_time']}x | "
                     f"{v['end_to_end_time']}x |")
    lines += [
        "", "Rates = the epoch's tokens (each trainer's own count) / (mean step time over the timed steps x steps); "
        f"the first {s['warmup_steps']} steps, model loading and tokenisation are not timed. `reference pass` = the "
        "one-off reference log-prob pass before step 1 (datamill always; TRL with precompute_ref_log_probs), "
        "`end-to-end` = epoch + that pass. Time ratios are TRL's time / datamill's. `other load` = cores used by "
        f"other processes during the timed steps" + (
            f" (a run disturbed by more than {result['max_other_load']} was rerun up to {result.get('retries', 1)} "
            "time(s), the least disturbed attempt kept)." if result.get("retries", 1) else
            "; --retries 0: no run was repeated."), "", "Setup:", "",
        f"- Model {s['model']}, LoRA r={s['lora']['r']}, alpha {s['lora']['alpha']}, dropout {s['lora']['dropout']} "
        f"on q/k/v/o, {s['precision']} on the CPU, no gradient checkpointing, dropout disabled (both trainers' "
        f"preference default). lr {s['lr']} {s['schedule']}, AdamW betas (0.9, 0.999) eps 1e-8, weight decay 0, "
        f"grad-norm clip 1.0, seed {s['seed']}, beta {s['beta']}, {s['loss']} loss, grad_accum 1.",
        f"- Data: {d['pairs']} pairs from the offline task families ({', '.join(d['families'])}; easy/medium/hard in "
        "turn); chosen = the correct reply, rejected = the reply with a wrong option from the row's choices (chat: "
        "another reply); ~70% wrapped in 1-3 more sentences. Completion tokens per side (datamill's count) "
        f"min/median/max {d['completion_len_min_median_max']}; mean side (prompt+completion) {d['mean_side_len']} "
        f"tokens, longest {d['longest_side']}; max_len {d['max_len']} per side (nothing truncated).",
        f"- Tokens per epoch: datamill {d['datamill_completion_tokens']} completion / {d['datamill_tokens']} all; "
        f"TRL {d['trl_completion_tokens']} / {d['trl_tokens']}. TRL's completion is prompt+completion minus the "
        "prompt rendered with the generation prompt, so it also counts the template's newline after <|im_end|> "
        f"({d['trl_completion_tokens'] - d['datamill_completion_tokens']} more tokens, one per side); each "
        "trainer's rate uses its own count.",
        f"- Batches: {s['pairs_per_step']} pairs per optimizer step. TRL: per_device_train_batch_size "
        f"{s['pairs_per_step']}, chosen+rejected concatenated into one batch padded to its longest. datamill packed: "
        f"one row of 2 x {d['max_len']} per step holding whole pairs ({d['datamill_packed_rows']} rows = steps, "
        "pairs per step vary); datamill unpacked: batch_size "
        f"{s['pairs_per_step']} pairs, grouped by length, padded.",
        "", "Notes:", "",
        "- TRL's default with LoRA (precompute_ref_log_probs=False) runs the reference, the model with adapters "
        "disabled, as an extra no-grad forward on every step; datamill computes every reference log-prob once "
        "before step 1, in eval mode, in the same micro-batches (its cost is in the `reference pass` column and in "
        "`end-to-end`). TRL's precompute_ref_log_probs=True does the same one-off pass at construction.",
        "- datamill computes logits only at completion positions (a forward pre-hook on lm_head); TRL's DPOTrainer "
        "uses a chunked fused LM head that also returns entropy, mean logits and top-1 agreement for its metrics, "
        "and on the CPU (no Triton: trl/kernels/chunked_logprob.py `_use_triton`) it projects every position, "
        "prompt and padding included, masking afterwards; on CUDA it keeps only the completion positions.",
        *_gain_notes(runs),
        "- Few steps on a shared 2-core CPU: expect several percent of run-to-run noise, more when `other load` is "
        "high." + (" This run used 1 torch thread: other work held about one core throughout (`other load`), and "
                   "2 threads sharing the remaining core with it spin and stall (a matmul measured 71 GFLOP/s on 1 "
                   "thread and 41 on 2 just before the run). The ratios on an idle machine with 2 threads were not "
                   "measured." if m["torch_threads"] == 1 else ""), "",
        f"Command: `{result['command']}` (TRL comes with `pip install -e '.[bench]'`)", ""]
    return "\n".join(lines)


def _gain_notes(runs: dict) -> list[str]:
    """Where the difference comes from, in this run's numbers."""
    out = []
    if "trl" in runs and "trl-precomputed" in runs:
        a, b = runs["trl"], runs["trl-precomputed"]
        out.append(f"- TRL's per-step reference forward: {a['s_per_step']} s/step with it, {b['s_per_step']} "
                   f"precomputed ({1 - b['s_per_step'] / a['s_per_step']:.0%} of its step). What is left between "
                   "TRL precomputed and datamill is padding (TRL pads the step's 2 x pairs sequences to the longest: "
                   f"{b['padding_share']:.0%} of its slots) and the LM head: on the CPU TRL's fused head projects all "
                   "positions (prompt and padding too) onto the 49,152-token vocabulary, datamill's only the "
                   "completion positions (~45% of the tokens here).")
    if "datamill" in runs and "datamill-unpacked" in runs:
        a, b = runs["datamill"], runs["datamill-unpacked"]
        out.append(f"- datamill packed vs unpacked: {a['s_per_step']} vs {b['s_per_step']} s/step (padding "
                   f"{a['padding_share']:.0%} vs {b['padding_share']:.0%}). A packed row is 2 x max_len long and its "
                   "attention scores the whole row (a block-diagonal mask over all of it), while the length-grouped "
                   "padded batch attends within each ~100-token side; at these short lengths the extra attention "
                   "work can outweigh the padding it saves (within this benchmark's noise).")
    return out


if __name__ == "__main__":
    main()
