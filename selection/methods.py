"""Selection methods by name: a method is a function that scores candidates, higher = keep.

    from selection.methods import register_selector

    @register_selector("shortest")
    def shortest(candidates: list[str], targets: list[str]) -> list[float]:
        return [-len(c) for c in candidates]

and `select: {method: shortest, ...}` uses it (`params:` in the spec are passed as keyword
arguments). Without registering, `method: my_selectors:shortest` names a function in a module
next to the spec. Installed packages register theirs under the `datamill.selectors` entry-point
group.
A method's function may also declare any of these keyword arguments to receive them:

    rows, target_rows   the candidate and target tables (Polars DataFrames)
    seed                the step's seed
    model_dir           the local HF folder of the step's `model` (None when it has none)
    work_dir            a folder for intermediate files that survives an interrupted run
    cache_dir           a workspace folder kept across steps and runs, for results keyed by
                        their inputs (LESS's gradient datastore)
    progress            callable(n): n more candidates scored (drives the progress bar)
"""

from __future__ import annotations

import inspect
from typing import Callable

from datamill.registry import Registry

CONTEXT_ARGS = ("rows", "target_rows", "seed", "model_dir", "work_dir", "cache_dir", "progress")

# Built-in methods by module, imported on first use (numpy, zlib, torch... only when needed).
SELECTORS: Registry[Callable] = Registry(
    "selection method", group="datamill.selectors", check=callable, expects="a function",
    builtins={"zipfit": "selection.builtin:zipfit", "random": "selection.builtin:random_scores",
              "length": "selection.builtin:length", "dsir": "selection.builtin:dsir",
              "density": "selection.builtin:density", "less": "selection.builtin:less",
              "perplexity": "selection.builtin:perplexity"})
_selectors = SELECTORS.registered  # what register_selector added (tests remove theirs from it)


def register_selector(name: str):
    """Decorator: make `fn` available as `method: name` in `select` steps."""
    return SELECTORS.register(name)


def is_builtin(name: str) -> bool:
    return SELECTORS.is_builtin(name)


def method_names() -> list[str]:
    return SELECTORS.names()


def selector(name: str) -> Callable:
    return SELECTORS.get(name)


def wants(fn: Callable, name: str) -> bool:
    """Whether a method asks for the context argument `name` (or for every one, with **kwargs)."""
    parameters = inspect.signature(fn).parameters.values()
    return any(p.kind is p.VAR_KEYWORD or p.name == name for p in parameters)


def call(fn: Callable, candidates: list[str], targets: list[str], params: dict, context: dict):
    """Call a method with its params and the context arguments its signature asks for."""
    signature = inspect.signature(fn)
    takes_all = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    extra = {k: v for k, v in context.items() if takes_all or k in signature.parameters}
    clash = set(params) & set(CONTEXT_ARGS)
    if clash:
        raise ValueError(f"params may not set {', '.join(sorted(clash))}: those come from the step")
    return fn(candidates, targets, **params, **extra)
