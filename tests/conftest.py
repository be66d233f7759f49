"""Shared fixtures: offline settings, the model cache, quiet progress, the fake generation backend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(text, name="spec.yaml") -> path of a spec file in a fresh folder, with
    examples/data copied next to it as data/."""
    import shutil

    shutil.copytree(EXAMPLES / "data", tmp_path / "data", dirs_exist_ok=True)

    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Builtins that tests build land in this session's temp folder, not in the user's own cache
    (~/.cache/datamill/models); a DATAMILL_MODEL_CACHE that is already set is a cache to reuse."""
    if os.environ.get("DATAMILL_MODEL_CACHE"):
        yield
        return
    os.environ["DATAMILL_MODEL_CACHE"] = str(tmp_path_factory.mktemp("models"))
    yield
    os.environ.pop("DATAMILL_MODEL_CACHE", None)


@pytest.fixture(autouse=True)
def _quiet_progress():
    from datamill import progress

    progress.set_quiet(True)
    yield
    progress.set_quiet(False)


import plugin_steps  # noqa: E402,F401  (registers the test step kinds)


@pytest.fixture
def fake(monkeypatch):
    """Every `transformers` generate step in the test talks to tests/fake_backend.py's FakeBackend."""
    from datagen import backends
    from fake_backend import FakeBackend

    monkeypatch.setitem(backends.BACKENDS, "transformers", "fake_backend:FakeBackend")
    FakeBackend.reset()
    yield FakeBackend
    FakeBackend.reset()


@pytest.fixture
def spec_dir(tmp_path):
    """A folder with a stand-in model folder `model/` (the fake backend never loads it)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    return tmp_path
