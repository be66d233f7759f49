"""Every extension point by name: one small `Registry` per kind of thing (after lm-eval's
`lm_eval/api/registry.py`), loaded lazily.

A registry knows three sources of names:
- built-ins, given as "module:attr" strings and imported on first use, so that validating or
  planning a spec imports nothing heavy;
- objects registered in code (`@reg.register("name")`, for tests, notebooks and the stages'
  own modules);
- installed plugins, under the registry's entry-point group in their pyproject:

    [project.entry-points."datamill.steps"]
    generate = "datagen.generate_step:GenerateStep"

How to add each kind of extension, with a tested example: docs/EXTENDING.md.

Unknown names get a "did you mean" and the list of names; a plugin that fails to import is
reported as such when used, and left out of `names()` so it breaks nothing else. Spec fields
that name an entry are `str`s typed with `reg.name_type()`: validated against the registry
and listed as a JSON-schema enum, both read when used, so a name registered late counts.

The registries here are the core's: step kinds, trackers and the functions one stage offers the
others. The stages keep their own next to what they register: selectors
(selection/methods.py), generation backends (datagen/backends), output parsers
(datagen/parsing.py) and BYOD metrics (evals/byod.py).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Optional, TypeVar, Union

from datamill.errors import DatamillError, SpecError, did_you_mean

T = TypeVar("T")


def load(target: str):
    """The object a "module:attr" string names."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


class Registry(Generic[T]):
    """Named objects of one kind: built-in placeholders, registered objects, installed plugins.

    `name` says what an entry is in messages ("step kind"); `group` is the entry-point group of
    plugins; `check` is the type entries must be (a class: instances or subclasses of it) or a
    predicate, described in messages by `expects`; `hint` ends the message for an unknown name.
    """

    def __init__(self, name: str, *, group: Optional[str] = None,
                 check: Union[type, Callable[[Any], bool], None] = None, expects: str = "",
                 builtins: Optional[dict[str, str]] = None, hint: str = ""):
        self.name, self.group, self.check, self.hint = name, group, check, hint
        self.expects = expects or (f"a {check.__name__}" if isinstance(check, type) else "valid")
        self.builtins: dict[str, str] = dict(builtins or {})  # name -> "module:attr", imported on use
        self.registered: dict[str, T] = {}  # registered in code; shadows a built-in of the same name
        self._plugins: Optional[dict[str, Any]] = None  # entry points, scanned once (again on a miss)
        self._broken: dict[str, str] = {}  # plugin name -> why it failed to import

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {len(self.builtins)} built-in, {len(self.registered)} registered)"

    # --- registering ---------------------------------------------------------------------

    def register(self, name: str, obj: Optional[T] = None):
        """Make `obj` available as `name`; without `obj`, a decorator: `@reg.register("mine")`."""
        if obj is None:
            return lambda target: self.register(name, target)
        if not self._valid(obj):
            raise TypeError(self._wrong_type(name, obj))
        self.registered[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Forget an object registered in code (a built-in it shadowed is back)."""
        self.registered.pop(name, None)

    # --- looking up ----------------------------------------------------------------------

    def get(self, name: str) -> T:
        """The object named `name`, imported if need be; SpecError when there is none."""
        if name in self.registered:
            return self.registered[name]
        if name in self.builtins:
            return self._checked(name, load(self.builtins[name]))
        plugin = self._entry_points().get(name) or self._entry_points(rescan=True).get(name)
        if plugin is None:
            raise SpecError(self.unknown(name))
        try:
            obj = plugin.load()
        except Exception as e:  # a broken plugin must not break specs that don't use it
            self._broken[name] = f"{type(e).__name__}: {e}"
            raise SpecError(self._broken_message(name)) from None
        self._broken.pop(name, None)
        return self._checked(name, obj)

    __getitem__ = get

    def names(self) -> list[str]:
        """Names that can be used, sorted: a plugin that fails to import is left out."""
        usable = set(self.builtins) | set(self.registered)
        for name in self._entry_points():
            if name not in usable:
                try:
                    self.get(name)
                except SpecError:
                    continue
                usable.add(name)
        return sorted(usable)

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self.registered or name in self.builtins or name in self._entry_points()

    def is_builtin(self, name: str) -> bool:
        """Whether `name` is a built-in that nothing registered in code shadows."""
        return name in self.builtins and name not in self.registered

    def broken(self, name: str) -> Optional[str]:
        """Why an installed plugin of this name could not be imported, if it could not."""
        return self._broken.get(name)

    def unknown(self, name: str) -> str:
        """The message for a name that is not here: the closest name and all of them."""
        names = self.names()
        return (f"unknown {self.name} '{name}'{did_you_mean(name, names)} (available: {', '.join(names) or 'none'})"
                + (f"; {self.hint}" if self.hint else ""))

    # --- spec fields -----------------------------------------------------------------------

    def validate(self, name: str) -> str:
        """`name` if it can be used, else ValueError with the message a spec error shows."""
        if name in self.registered or name in self.builtins or name in self.names():
            return name
        raise ValueError(self._broken_message(name) if self.broken(name) else self.unknown(name))

    def name_type(self):
        """The type of a spec field naming an entry: a `str` checked by `validate` and listed
        as a JSON-schema enum of `names()`, both read when used (so late registrations count)."""
        from typing import Annotated

        return Annotated[str, _NameOf(self)]

    # --- internals -----------------------------------------------------------------------------

    def _entry_points(self, rescan: bool = False) -> dict[str, Any]:
        if self.group is None:
            return {}
        if self._plugins is None or rescan:
            from importlib.metadata import entry_points

            self._plugins = {ep.name: ep for ep in entry_points(group=self.group)}
        return self._plugins

    def _valid(self, obj) -> bool:
        if self.check is None:
            return True
        if isinstance(self.check, type):
            return isinstance(obj, self.check) or (isinstance(obj, type) and issubclass(obj, self.check))
        return bool(self.check(obj))

    def _wrong_type(self, name: str, obj) -> str:
        return f"{self.name} '{name}' must be {self.expects}, not {obj!r}"

    def _checked(self, name: str, obj) -> T:
        if not self._valid(obj):
            raise SpecError(self._wrong_type(name, obj))
        return obj

    def _broken_message(self, name: str) -> str:
        return f"{self.name} '{name}' is installed but failed to import: {self._broken[name]}"


class _NameOf:
    """Pydantic marker of a `str` field naming an entry of a registry (see Registry.name_type)."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def __get_pydantic_core_schema__(self, source, handler):
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(self.registry.validate, handler(source))

    def __get_pydantic_json_schema__(self, schema, handler):
        out = handler(schema)
        out["enum"] = self.registry.names()
        return out


# --------------------------------------------------------------------------- the core's registries


def _is_step(obj) -> bool:
    from datamill.step import Step

    return isinstance(obj, type) and issubclass(obj, Step)


STEPS: Registry[type] = Registry("step kind", group="datamill.steps", check=_is_step, expects="a Step subclass",
                                 builtins={"source": "datamill.steps.source:SourceStep",
                                           "sql": "datamill.steps.sql:SqlStep",
                                           "polars": "datamill.steps.polars_step:PolarsStep",
                                           "dedup": "datamill.steps.dedup:DedupStep"})
TRACKERS: Registry[type] = Registry("tracker", group="datamill.trackers", check=type, expects="a class")
FUNCTIONS: Registry[Callable] = Registry("stage function", group="datamill.functions", check=callable,
                                         expects="callable", hint="is datamill installed (pip install -e .)?")


def step_kinds() -> list[str]:
    """Kinds that can be used: a plugin that fails to import is left out (and reported when used)."""
    return STEPS.names()


def step_class(kind: str):
    return STEPS.get(kind)


def broken_plugin(kind: str) -> Optional[str]:
    """Why an installed step kind could not be imported, if it could not."""
    return STEPS.broken(kind)


def register_step(cls) -> type:
    """Register a Step subclass by its `kind` (usable as a class decorator)."""
    return STEPS.register(cls.kind, cls)


def unregister_step(kind: str) -> None:
    STEPS.unregister(kind)


def tracker_class(name: str = "mlflow"):
    return TRACKERS.get(name)


def function(name: str):
    """A function one stage offers the others (entry-point group `datamill.functions`), so that
    stages never import each other: e.g. LESS warms up with `registry.function("fine_tune")`.
    See each stage's pyproject entry for what is offered. A missing one is an installation
    problem, not the spec's: DatamillError."""
    try:
        return FUNCTIONS.get(name)
    except SpecError as e:
        raise DatamillError(str(e)) from None
