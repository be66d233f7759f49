"""Generation backends behind one interface (see base.py), by name. Each is imported only when used.

A backend is a class with `generate(requests, on_result)` and `stats`. A local one (the default)
is built as `cls(model_dir, batch_size=, dtype=, device=, progress_desc=)` on the resolved model
folder; one with the class attribute `local = False` talks to a server (`openai`). Add your own
with one decorator, or under the `datamill.backends` entry-point group of an installed package:

    from datagen import backends

    @backends.register("mine")
    class MyBackend: ...

and `generate: {backend: mine, ...}` uses it.
"""

from __future__ import annotations

from datamill.registry import Registry


def _is_backend(obj) -> bool:
    return isinstance(obj, type) and callable(getattr(obj, "generate", None))


REGISTRY: Registry[type] = Registry(
    "generation backend", group="datamill.backends", check=_is_backend,
    expects="a class with a `generate(requests, on_result)` method",
    builtins={"transformers": "datagen.backends.local:TransformersBackend",
              "openai": "datagen.backends.openai_compat:OpenAIBackend",
              "vllm": "datagen.backends.vllm_engine:VLLMBackend"})
BACKENDS = REGISTRY.builtins  # name -> "module:Class" (tests point "transformers" at a fake)
BackendName = REGISTRY.name_type()  # the `backend` field of a spec: a name, checked and listed in the schema
register = REGISTRY.register


def names() -> list[str]:
    return REGISTRY.names()


def backend_class(name: str) -> type:
    return REGISTRY.get(name)


def is_local(name: str) -> bool:
    """Whether the backend runs a model folder here (its class's `local`, default True), so the
    step resolves `model` as a model reference. Imports the backend's module, never torch."""
    return getattr(backend_class(name), "local", True)
