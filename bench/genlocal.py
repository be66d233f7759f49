"""Tokens/s of the `transformers` generation backend with SmolLM2-135M-Instruct on this machine:
batch 1 vs 16 vs 64, next to the peer, plain Hugging Face `model.generate` at batch 1 (how one
would write it by hand).

Same chat-templated GenQA prompts everywhere (the shipped library, rendered for requests 0..N),
greedy decoding (so every configuration writes the same tokens), max_new_tokens fixed; a row
stops at <|im_end|>. Tokens/s counts generated tokens up to and including the end token, not
padding. One extra row samples (temperature 0.7, top_p 0.95) through the per-request seeded
sampler, to show what reproducible sampling costs.

Run:  .venv/bin/python bench/genlocal.py      (a few minutes on 2 cores; writes bench/genlocal.json and .md)
Uses datamill's model cache (DATAMILL_MODEL_CACHE, else ~/.cache/datamill/models; built once, ~30 s).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_TOKENS = 64
SMALL = 16  # prompts for the batch-1 runs (slow)
LARGE = 64  # prompts for the batched runs


def requests(n: int, temperature: float = 0.0):
    from datagen import prompt_library
    from datagen.generate_step import GenerateConfig, plan_requests

    names = prompt_library.library_names()
    config = GenerateConfig(model="smol", prompts=names, n=n, temperature=temperature, top_p=0.95,
                            max_tokens=MAX_TOKENS)
    return [p.request for p in plan_requests(config, [prompt_library.load(x, ROOT) for x in names], "bench")]


def peer_batch1(folder: Path, reqs) -> dict:
    """Plain transformers, one prompt at a time: the baseline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = 0
    start = time.perf_counter()
    for r in reqs:
        inputs = tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    seconds = time.perf_counter() - start
    return {"requests": len(reqs), "tokens_out": int(tokens), "seconds": round(seconds, 2)}


def backend_run(folder: Path, reqs, batch_size: int) -> dict:
    from datagen.backends.local import TransformersBackend

    backend = TransformersBackend(folder, batch_size=batch_size, device="cpu")
    start = time.perf_counter()
    backend.generate(reqs, lambda result: None)
    seconds = time.perf_counter() - start
    return {"requests": len(reqs), "tokens_out": backend.stats.tokens_out, "seconds": round(seconds, 2)}


def main() -> None:
    import torch

    from datamill import progress
    from datamill.models import resolve_model
    from datamill.workspace import model_cache_dir

    progress.set_quiet(True)
    folder = resolve_model("builtin:smollm2-135m-instruct", base_dir=ROOT, cache_dir=model_cache_dir())
    load_before = os.getloadavg()
    runs = {}
    runs["peer: HF model.generate, batch 1"] = peer_batch1(folder, requests(SMALL))
    runs["datamill transformers, batch 1"] = backend_run(folder, requests(SMALL), 1)
    runs["datamill transformers, batch 16"] = backend_run(folder, requests(LARGE), 16)
    runs["datamill transformers, batch 64"] = backend_run(folder, requests(LARGE), 64)
    runs["datamill transformers, batch 16, sampling T=0.7"] = backend_run(folder, requests(LARGE, 0.7), 16)
    for r in runs.values():
        r["tokens_per_s"] = round(r["tokens_out"] / r["seconds"], 1)
    peer = runs["peer: HF model.generate, batch 1"]["tokens_per_s"]
    for r in runs.values():
        r["vs_peer"] = round(r["tokens_per_s"] / peer, 2)
    machine = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "system": platform.system(),
        "load_avg_1m_before": round(load_before[0], 2), "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }
    result = {"model": "SmolLM2-135M-Instruct (fp32, CPU)", "max_new_tokens": MAX_TOKENS, "decoding": "greedy",
              "machine": machine, "runs": runs}
    (ROOT / "bench" / "genlocal.json").write_text(json.dumps(result, indent=2) + "\n")
    print(write_markdown(result))


def write_markdown(result: dict) -> str:
    machine, runs = result["machine"], result["runs"]
    lines = [f"# Local generation throughput: SmolLM2-135M-Instruct, fp32, CPU "
             f"({machine['cores']} cores, torch {machine['torch']}, {machine['torch_threads']} threads)", "",
             f"Greedy unless noted, max_new_tokens={result['max_new_tokens']}, chat-templated GenQA library "
             "prompts; tokens counted up to the end token, padding excluded. 1-minute load average "
             f"{machine['load_avg_1m_before']} before the run (work of other processes, which slows every row "
             f"alike; the benchmark itself brings it to ~{machine['load_avg_1m_after']}).", "",
             "| run | requests | tokens out | seconds | tokens/s | vs peer |", "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['requests']} | {r['tokens_out']} | {r['seconds']} | {r['tokens_per_s']} | "
                     f"{r['vs_peer']}x |")
    lines += ["", "Batched rows that finish early keep their slot until the longest row of the batch ends, "
              "so the gain from batching is below the batch size; sampling through the per-request "
              "seeded sampler costs a few percent over greedy."]
    text = "\n".join(lines) + "\n"
    (ROOT / "bench" / "genlocal.md").write_text(text)
    return text

if __name__ == "__main__":
    main()
