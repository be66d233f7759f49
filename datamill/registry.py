"""Step kinds and trackers by name, loaded lazily.

Core kinds are listed below as "module:Class" strings so nothing is imported until a spec
uses them. Stage packages (datagen, selection, train, evals) and user plugins register
theirs under the `datamill.steps` entry-point group in their pyproject:

    [project.entry-points."datamill.steps"]
    generate = "datagen.step:GenerateStep"

Tests and notebooks can also call `register_step(StepClass)`.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

from datamill.errors import SpecError, did_you_mean

CORE_STEPS = {
    "source": "datamill.steps.source:SourceStep",
    "sql": "datamill.steps.sql:SqlStep",
    "polars": "datamill.steps.polars_step:PolarsStep",
    "dedup": "datamill.steps.dedup:DedupStep",
}

_registered: dict[str, type] = {}
_broken: dict[str, str] = {}  # kind -> why its plugin failed to import


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, object]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="datamill.steps")}


def step_kinds() -> list[str]:
    """Kinds that can be used: a plugin that fails to import is left out (and reported when used)."""
    kinds = []
    for kind in sorted(set(CORE_STEPS) | set(_entry_points()) | set(_registered)):
        try:
            step_class(kind)
        except SpecError:
            continue
        kinds.append(kind)
    return kinds


def broken_plugin(kind: str) -> str | None:
    """Why an installed step kind could not be imported, if it could not."""
    return _broken.get(kind)


def step_class(kind: str):
    if kind in _registered:
        return _registered[kind]
    if kind in CORE_STEPS:
        return _load(CORE_STEPS[kind])
    if kind in _entry_points():
        try:
            return _entry_points()[kind].load()
        except Exception as e:  # a broken plugin must not break specs that don't use it
            _broken[kind] = f"{type(e).__name__}: {e}"
            raise SpecError(f"step kind '{kind}' is installed but failed to import: {_broken[kind]}") from None
    raise SpecError(f"unknown step kind '{kind}'{did_you_mean(kind, step_kinds())}")


def register_step(cls) -> type:
    """Register a Step subclass by its `kind` (usable as a class decorator)."""
    _registered[cls.kind] = cls
    return cls


def unregister_step(kind: str) -> None:
    _registered.pop(kind, None)


def tracker_class(name: str = "mlflow"):
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group="datamill.trackers")}
    if name not in eps:
        raise SpecError(f"no tracker '{name}' is installed{did_you_mean(name, eps)}")
    return eps[name].load()


def function(name: str):
    """A function one stage offers the others (entry-point group `datamill.functions`), so that
    stages never import each other: e.g. LESS warms up with `registry.function("fine_tune")`.
    See each stage's pyproject entry for what is offered."""
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group="datamill.functions")}
    if name not in eps:
        from datamill.errors import DatamillError

        raise DatamillError(f"no stage offers the function '{name}'{did_you_mean(name, eps)} "
                            f"(offered: {', '.join(sorted(eps)) or 'none'}); is datamill installed (pip install -e .)?")
    return eps[name].load()
