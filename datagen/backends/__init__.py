"""Generation backends behind one interface (see base.py). Each is imported only when used."""

from __future__ import annotations

BACKENDS = {
    "transformers": "datagen.backends.local:TransformersBackend",
    "openai": "datagen.backends.openai_compat:OpenAIBackend",
    "vllm": "datagen.backends.vllm_engine:VLLMBackend",
}


def backend_class(name: str):
    import importlib

    module, _, attr = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
