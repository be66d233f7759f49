"""LESS gradient features: one backward pass per batch (datamill) vs one backward per example
(the way LESS's reference collects them, batch size 1), on the same model and examples.

Both compute the same thing: each example's LoRA gradient of its mean assistant-token loss,
made Adam-aware with a fixed optimizer state, projected with the same seeded Rademacher matrix
and normalised. Reported: seconds, examples/s, the speed ratio and the largest absolute
difference between the two feature matrices.

Run:  .venv/bin/python bench/less_grads.py                 (512 examples, tiny-llama; ~1 min)
      .venv/bin/python bench/less_grads.py --models tiny-llama smollm2-135m-instruct
Writes bench/less_grads.json and bench/less_grads.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_name, model_cache  # noqa: E402  (bench/machine.py)


def main(argv=None) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from datagen.tasks import generate_tasks
    from datamill.models import resolve_model
    from datamill.registry import function
    from selection.less import features

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--models", nargs="+", default=["tiny-llama"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--proj-dim", type=int, default=8192)
    parser.add_argument("--cache-dir", default=str(model_cache()), help="where builtin models are built")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    convs = [row["messages"] for row in generate_tasks(None, args.examples, 0)]
    rows = []
    for name in args.models:
        folder = resolve_model(f"builtin:{name}", base_dir=ROOT, cache_dir=Path(args.cache_dir))
        examples = function("encode_examples")(folder, convs, max_len=256)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])).eval()
        names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        gen = torch.Generator().manual_seed(1)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in names:
                if "lora_B" in n:
                    params[n].normal_(0, 0.02, generator=gen)
        moments = {n: {"exp_avg": torch.randn(params[n].shape, generator=gen) * 1e-3,
                       "exp_avg_sq": torch.rand(params[n].shape, generator=gen) * 1e-6} for n in names}
        timings = {}
        feats = {}
        for mode in ("batched", "looped"):
            start = time.perf_counter()
            feats[mode] = features(model, examples, names, moments, args.proj_dim, seed=0,
                                   batch_size=args.batch_size, loop=mode == "looped")
            timings[mode] = time.perf_counter() - start
            print(f"{name} {mode}: {timings[mode]:.1f} s", flush=True)
        diff = float(abs(feats["batched"] - feats["looped"]).max())
        rows.append({"model": name, "examples": len(examples), "lora_params": sum(params[n].numel() for n in names),
                     "batched_s": round(timings["batched"], 2), "looped_s": round(timings["looped"], 2),
                     "speedup": round(timings["looped"] / timings["batched"], 2),
                     "batched_examples_per_s": round(len(examples) / timings["batched"], 1),
                     "max_abs_diff": diff})
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "python": platform.python_version()},
              "date": time.strftime("%Y-%m-%d"), "batch_size": args.batch_size, "proj_dim": args.proj_dim,
              "rows": rows, "goal_speedup": 3.0, "command": "HF_HUB_OFFLINE=1 .venv/bin/python bench/less_grads.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    (ROOT / "bench" / "less_grads.json").write_text(json.dumps(result, indent=2) + "\n")
    (ROOT / "bench" / "less_grads.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# LESS gradient features: batched vs one backward per example ({m['cpu']}, {m['cores']} cores)", "",
             f"torch {m['torch']}, Python {m['python']}, {r['date']}. LoRA r=8 on q/k/v/o, Adam-aware, projected to "
             f"{r['proj_dim']} dims, batch {r['batch_size']}; task-family conversations, max_len 256.", "",
             "| model | examples | LoRA params | one backward per example | batched | speedup | examples/s | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['model']} | {row['examples']} | {row['lora_params']:,} | {row['looped_s']} s | "
                     f"{row['batched_s']} s | **{row['speedup']}x** | {row['batched_examples_per_s']} | "
                     f"{row['max_abs_diff']:.1e} |")
    lines += ["", f"Goal (selection issue): >= {r['goal_speedup']}x on CPU, features equal to ~1e-5. Not met for "
              "SmolLM2 on this CPU: a 135M model's forward and backward over ~100-token examples are already "
              "compute-bound one example at a time (the profile is matmuls, not per-call overhead; batches are "
              "length-sorted, so padding is small); tiny-llama's time goes to its 49,152-word output layer (the softmax and its "
              "backward at every answer token, the same work in both paths; profiled), so batching saves only the "
              "per-call overhead; the batched path pays off where per-example calls are latency-bound (GPUs: "
              "untested here, no GPU in this task). The projection (a dense seeded Rademacher "
              "matrix made block by block) costs ~3 s per 54 x 921,600 chunk at 512 dims and grows linearly "
              "with the dimension: 8192 dims on CPU needs a faster projector.", "",
              f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
