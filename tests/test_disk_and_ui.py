"""Hardening: `datamill ui` never leaves its MLflow server behind; models do not eat the disk
(merged LoRA models keep their base's dtype, builtins are converted once per user)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from datamill.errors import DatamillError

DATAMILL = Path(sys.executable).parent / "datamill"  # the venv's console script, as a user runs it


# --------------------------------------------------------------------------- `datamill ui` and signals

def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _mlflow_processes(port: int) -> list[int]:
    """Live (not zombie) processes whose command line names mlflow and this port."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # it ended while we looked
        if state != "Z" and any(b"mlflow" in arg for arg in cmdline) and str(port).encode() in cmdline:
            found.append(int(entry.name))
    return found


# ~15 s each: SIGHUP takes the same path as SIGTERM, so it runs in the slow suite
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGHUP, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGHUP"])
def test_ui_stops_its_server_when_it_is_terminated(tmp_path, sig):
    """The server runs in its own session, so a signal sent to `datamill ui` alone never reaches it:
    `datamill ui` must stop it, then exit with 128 + the signal's number."""
    from tracking.ui import free_port

    spec = tmp_path / "spec.yaml"
    spec.write_text("name: ui\nsources:\n  tasks: {generator: tasks, families: [arithmetic], n: 4}\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the spec's own sqlite store
    log = tmp_path / "ui.log"  # a file, not a pipe nobody reads while it runs
    with log.open("wb") as out:
        ui = subprocess.Popen([str(DATAMILL), "ui", str(spec), "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=out, stderr=subprocess.STDOUT)
    health = f"http://127.0.0.1:{port}/health"
    try:
        deadline = time.monotonic() + 120
        while not _answers(health):
            assert ui.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow UI never answered"
            time.sleep(0.5)
        assert _mlflow_processes(port)  # the check below can see the server

        os.kill(ui.pid, sig)  # datamill ui alone, not its process group
        code = ui.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _answers(health) or _mlflow_processes(port):
            assert time.monotonic() < deadline, f"left behind: {_mlflow_processes(port)}, answers: {_answers(health)}"
            time.sleep(0.5)
        assert code == 128 + sig
    finally:  # a failed test must not leave its processes either
        if ui.poll() is None:
            ui.kill()
            ui.wait()
        for pid in _mlflow_processes(port):
            os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- merged models keep their dtype

@pytest.fixture(scope="module")
def tiny():
    from datamill.models import resolve_model
    from datamill.workspace import model_cache_dir

    return resolve_model("builtin:tiny-llama", base_dir=Path("."), cache_dir=model_cache_dir())  # the session's


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_a_merged_lora_model_is_saved_in_its_bases_dtype(tiny, write_spec, tmp_path):
    """Training upcasts a bf16 base to float32; the merged model goes back to bf16 (half the disk)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(base)
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"

    from datamill.api import run

    spec = write_spec("""
name: bf
models: {base: ./bf16-base}
sources:
  tasks: {generator: tasks, families: [arithmetic], n: 16, seed: 0}
steps:
  sft:
    train: {model: base, data: tasks, max_len: 64, batch_size: 4, max_steps: 2, lr: 0.01, lora: {r: 4}}
tracking: {enabled: false}
""")
    merged = run(spec).points[-1].steps["sft"].model_dir
    weights = load_file(str(merged / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    base_weights = load_file(str(base / "model.safetensors"))
    assert any(not torch.equal(weights[k], base_weights[k]) for k in weights)  # it did train and merge
    # the same size as its base, not twice it (the tokenizer files are the same in both)
    assert _folder_bytes(merged) < 1.1 * _folder_bytes(base)


# --------------------------------------------------------------------------- one builtin cache per user

TRAIN_SPEC = """
name: {name}
models: {{tiny: builtin:tiny-llama}}
sources:
  tasks: {{generator: tasks, families: [arithmetic], n: 8, seed: 0}}
steps:
  sft:
    train: {{model: tiny, data: tasks, max_len: 64, batch_size: 2, max_steps: 1, lora: {{r: 2}}, save: adapter}}
tracking: {{enabled: false}}
"""


def test_specs_in_different_folders_share_one_builtin_model_cache(tmp_path, monkeypatch):
    from datamill.api import run

    monkeypatch.delenv("DATAMILL_MODEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = tmp_path / "xdg" / "datamill" / "models" / "tiny-llama"
    bases, builds = [], []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "spec.yaml").write_text(TRAIN_SPEC.format(name=name))
        adapter = run(folder / "spec.yaml").points[-1].steps["sft"].model_dir
        # an adapter names the base folder it was trained on
        bases.append(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
        marker = (cache / ".datamill-built.json").stat()
        builds.append((marker.st_ino, marker.st_mtime_ns))
        assert not (folder / ".datamill" / "models").exists() and not (folder / "models").exists()
    assert bases == [str(cache), str(cache)]
    assert builds[0] == builds[1]  # built by the first spec, reused by the second


def test_an_unwritable_model_cache_names_the_setting_that_moves_it(tmp_path, monkeypatch):
    from datamill.models import resolve_model
    from datamill.workspace import model_cache_dir

    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("DATAMILL_MODEL_CACHE", str(tmp_path / "a-file" / "models"))
    with pytest.raises(DatamillError) as err:
        resolve_model("builtin:tiny-llama", base_dir=tmp_path, cache_dir=model_cache_dir())
    message = str(err.value)
    assert f"cannot write the model cache {tmp_path / 'a-file' / 'models'}" in message
    assert "set DATAMILL_MODEL_CACHE to a folder you can write to" in message
