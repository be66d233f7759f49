"""Cross-stage contracts (datamill/contracts.py): every function a stage fetches by name is
declared in core, offered by an installed stage, and has the declared signature; the trainer's
per-epoch state reads back through its owner's reader."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from datamill.contracts import FUNCTIONS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("datamill", "datagen", "selection", "train", "evals", "tracking", "bench")
FETCHED = re.compile(r'function\(\s*"([a-z_]+)"\s*\)')


def fetched_names() -> dict[str, list[str]]:
    """{function name: the files that fetch it} over the repo's Python (docstrings included)."""
    found: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in FETCHED.findall(path.read_text(encoding="utf-8")):
                found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def shape(signature: inspect.Signature) -> list[tuple]:
    """Parameters as (name, kind, default): annotations left out (strings under
    `from __future__ import annotations`, types elsewhere)."""
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def declared(protocol) -> inspect.Signature:
    """The signature of a Protocol's `__call__`, without `self`."""
    signature = inspect.signature(protocol.__call__)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def test_the_scan_finds_the_functions_stages_fetch():
    found = fetched_names()
    assert {"fine_tune", "encode_examples", "load_epoch_state", "neighbours", "contamination"} <= set(found)
    assert "selection/less.py" in found["load_epoch_state"]


@pytest.mark.parametrize("name", sorted(fetched_names()))
def test_every_fetched_function_is_declared_in_core(name):
    assert name in FUNCTIONS, f"function({name!r}) is fetched in {fetched_names()[name]} but not declared in " \
                              f"datamill/contracts.py FUNCTIONS"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_declared_function_is_offered_with_its_declared_signature(name):
    from datamill.registry import function

    offered = function(name)
    assert callable(offered)
    assert shape(inspect.signature(offered)) == shape(declared(FUNCTIONS[name])), \
        f"{name}: offered as {inspect.signature(offered)}, declared as {declared(FUNCTIONS[name])}"


def test_the_signature_check_sees_a_difference():
    """The comparison is not vacuous: a renamed parameter, a changed default or kind all differ."""
    from datamill.contracts import LogDensity

    def renamed(queries, references, *, embedder=None, bandwidth="median"): ...

    def other_default(queries, reference, *, embedder=None, bandwidth="scott"): ...

    def positional(queries, reference, embedder=None, bandwidth="median"): ...

    def same(queries: list, reference: list, *, embedder=None, bandwidth: object = "median") -> None: ...

    want = shape(declared(LogDensity))
    assert shape(inspect.signature(same)) == want
    for wrong in (renamed, other_default, positional):
        assert shape(inspect.signature(wrong)) != want


def test_contracts_import_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, datamill.contracts; print(' '.join(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_load_epoch_state_reads_back_what_the_trainer_writes(tmp_path):
    """The trainer writes an epoch's state; its reader (what LESS loads each checkpoint with) gives
    the weights of the LoRA parameters that trained and their Adam moments: the last epoch's
    weights are those of the saved adapter."""
    import torch
    from safetensors.torch import load_file

    from datamill.models import resolve_model
    from datamill.registry import function

    tiny = resolve_model("builtin:tiny-llama", base_dir=Path("."), cache_dir=tmp_path / "models")
    convs = [[{"role": "user", "content": f"{a} + {a}?"}, {"role": "assistant", "content": str(2 * a)}]
             for a in range(8)]
    result = function("fine_tune")(tiny, convs, tmp_path / "out", state_dir=tmp_path / "state", lora={"r": 4},
                                   epochs=2, batch_size=4, max_len=64, packing="off", epoch_checkpoints=True,
                                   checkpoint_every=None, save="adapter")
    states = result["epoch_states"]
    assert [(s["epoch"], s["step"]) for s in states] == [(1, 2), (2, 4)]
    assert all(set(s) == {"epoch", "mean_lr", "step", "path"} and s["mean_lr"] > 0 for s in states)

    load = function("load_epoch_state")
    first, last = load(states[0]["path"]), load(Path(states[-1]["path"]))
    assert set(last) == {"weights", "moments"}
    assert last["weights"] and all("lora_" in name for name in last["weights"])
    assert set(last["moments"]) == set(last["weights"])
    for name, weight in last["weights"].items():
        moments = last["moments"][name]
        assert moments["exp_avg"].shape == moments["exp_avg_sq"].shape == weight.shape
        assert weight.device.type == "cpu"
    assert any(not torch.equal(first["weights"][n], last["weights"][n]) for n in last["weights"])
    adapter = load_file(Path(result["model_dir"]) / "adapter_model.safetensors")
    for name, weight in last["weights"].items():
        torch.testing.assert_close(adapter[name.replace(".default", "")], weight, rtol=0, atol=0)
