"""Self-supervised (BYOD) metrics: examples/s per transformation, batched vs one example at a time.

SmolLM2-135M-Instruct on CPU, the built-in python-docs corpus, the same examples for both: the
reference computes each example alone (no batching, to avoid padding effects); datamill batches
them (right padding, each row's numbers taken from its own positions). Reported per metric:
examples, seconds and examples/s for batch 16 and batch 1, the speedup, and the largest
difference between the two runs' per-example scores (batching must not change them; the
toxicity metric samples, so its scores are compared only for their count).

Run:  HF_HUB_OFFLINE=1 .venv/bin/python bench/byod_throughput.py          (~10 min on 2 cores)
Writes bench/byod_throughput.json and bench/byod_throughput.md.
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48, help="per metric")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datamill.models import resolve_model
    from evals.byod import METRICS, python_docs_corpus, run_metric

    torch.set_num_threads(os.cpu_count() or 1)
    folder = resolve_model("builtin:smollm2-135m-instruct", base_dir=ROOT, cache_dir=model_cache())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = python_docs_corpus()
    rows = []
    for metric in METRICS:
        timing, scores = {}, {}
        for batch in (args.batch_size, 1):
            start = time.perf_counter()
            found, summary = run_metric(metric, model, tokenizer, texts, max_examples=args.examples, batch_size=batch)
            timing[batch], scores[batch] = time.perf_counter() - start, [r["score"] for r in found]
        n = len(scores[1])
        diff = None if metric == "toxicity" else max(abs(a - b) for a, b in zip(scores[args.batch_size], scores[1]))
        rows.append({"metric": metric, "examples": n, "batched_s": round(timing[args.batch_size], 2),
                     "single_s": round(timing[1], 2), "batched_examples_per_s": round(n / timing[args.batch_size], 2),
                     "single_examples_per_s": round(n / timing[1], 2),
                     "speedup": round(timing[1] / timing[args.batch_size], 2), "max_abs_diff": diff})
        print(rows[-1], flush=True)
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "python": platform.python_version()},
              "date": time.strftime("%Y-%m-%d"), "model": "builtin:smollm2-135m-instruct", "batch_size": args.batch_size,
              "rows": rows, "command": "HF_HUB_OFFLINE=1 .venv/bin/python bench/byod_throughput.py"}
    (ROOT / "bench" / "byod_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (ROOT / "bench" / "byod_throughput.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# BYOD metrics: examples/s per transformation ({m['cpu']}, {m['cores']} cores)", "",
             f"{r['model']}, fp32 CPU, torch {m['torch']}, Python {m['python']}, {r['date']}; the built-in python-docs "
             f"corpus. Batched (batch {r['batch_size']}) vs one example at a time (the reference's way), same examples.",
             "", "| metric | examples | batched | examples/s | one at a time | examples/s | speedup | max score diff |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        diff = "sampled" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.1e}"
        lines.append(f"| {row['metric']} | {row['examples']} | {row['batched_s']} s | {row['batched_examples_per_s']} | "
                     f"{row['single_s']} s | {row['single_examples_per_s']} | **{row['speedup']}x** | {diff} |")
    lines += ["", "Each example costs two forward passes (original and perturbed); toxicity samples 20 tokens "
              "twice.", "", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
