"""bench/gpu.py, the GPU check, on the CPU at its --quick sizes: the script runs end to end
(datamill's training loop in a worker process, the report), every planned row gets a line, and
MFU is refused on a CPU. Nothing is downloaded: the models are builtin:tiny-llama and a tiny
Llama built from a config."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_table_and_flops():
    gpu = _module()
    assert gpu.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989
    assert gpu.peak_tflops_for("NVIDIA H100 PCIe") == 756
    assert gpu.peak_tflops_for("NVIDIA H200") == 989
    assert gpu.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312
    assert gpu.peak_tflops_for("NVIDIA L4") == 121
    assert gpu.peak_tflops_for("NVIDIA L40S") is None  # not L4: needs --peak-tflops
    assert gpu.peak_tflops_for(None) is None
    shapes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                  tie_word_embeddings=False)
    full = gpu.model_flops(shapes, 10_000, 10_000, "full", 10.0)
    assert full["matmul_params"] == 10_000 - 6_400  # the untied input embedding is a lookup
    assert full["dense_per_token"] == 6 * 3_600
    assert full["attention_per_token"] == 12 * 2 * 64 * 10.0
    lora = gpu.model_flops(dict(shapes, tie_word_embeddings=True), 10_000, 100, "lora", 10.0)
    assert lora["dense_per_token"] == 4 * 10_000 + 2 * 100
    assert gpu.mfu(1e9, 1000.0, 1.0) == pytest.approx(1.0)
    assert gpu.mfu(1e9, 1000.0, None) is None
    assert gpu.mean_causal_context([1, 3]) == pytest.approx((1 + 6) / 4)


def test_error_rows_reach_the_table():
    gpu = _module()
    result = {"quick": True, "total_seconds": 1.0, "command": "x", "peak_tflops": None, "smol": None,
              "machine": {"date": "d", "torch": "t", "cuda": None, "transformers": "tr", "python": "3"},
              "sections": {"gen": [{"id": "greedy/b4", "error": "OutOfMemoryError: CUDA out of memory"}],
                           "vllm": [{"id": "vllm", "skipped": "vllm not installed"}]}}
    text = gpu.markdown(result)
    assert "| gen | greedy/b4 |  | ERROR |" in text and "CUDA out of memory" in text
    assert "vllm not installed" in text


def test_full_sizes_refused_on_cpu():
    gpu = _module()
    with pytest.raises(SystemExit):
        gpu.main(["--device", "cpu", "--sections", "sft"])


# ~35 s of CPU (45-50 s wall on an idle 2-core machine, 60-80 s when it is shared, more with a
# fresh model cache, which builds the SmolLM2 tokenizer from GGUF): over the fast suite's budget.
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_cpu_run(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--sections", "sft,vllm",
                           "--rows", "smollm2/lora,llama-1b/full", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=230)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {r["id"]: r for r in result["sections"]["sft"]}
    assert set(rows) == {"smollm2/lora", "llama-1b/full"}
    for row_id, row in rows.items():
        r = row.get("result")
        assert r is not None, row
        assert r["tokens_per_s"] > 0 and r["timed_steps"] == result["sizes"]["sft"]["steps"]
        assert r["mfu"] is None and r["mfu_note"] == "not reported on a CPU"  # no MFU on a CPU
        assert r["packing"] is True
    assert rows["smollm2/lora"]["result"]["mode"] == "lora"
    assert rows["llama-1b/full"]["result"]["trainable_params"] == rows["llama-1b/full"]["result"]["params"]
    assert result["sections"]["vllm"] == [{"id": "vllm", "skipped": "vllm runs on a GPU only (not on the CPU)"}]
    assert result["machine"]["gpu"] is None and result["peak_tflops"] is None
    md = out.with_suffix(".md").read_text()
    assert "| sft | LoRA r=8 q,k,v,o, fp32 | tiny-llama" in md
    assert "| sft | full fine-tuning, fp32 | Llama, tiny shapes" in md
    assert "| vllm | vllm |" in md
    assert md in proc.stdout  # the table is printed too
