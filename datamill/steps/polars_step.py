"""`polars`: a Python function `module:function` that takes and returns Polars DataFrames."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datamill.errors import FieldError
from datamill.hashing import hash_file
from datamill.step import Env, Step, StepConfig


class PolarsConfig(StepConfig):
    """Transform tables with your own Python function."""

    function: str
    """`module:function`; the module is looked up next to the spec first, then on sys.path."""
    input: str | list[str]
    """Table(s) passed to the function: one name -> one DataFrame argument; a list -> keyword arguments by name."""
    args: dict[str, Any] = {}
    """Extra keyword arguments for the function."""


class PolarsStep(Step):
    """Make a table with a Python function over Polars DataFrames."""

    kind = "polars"
    Config = PolarsConfig

    @property
    def inputs(self) -> list[str]:
        return [self.config.input] if isinstance(self.config.input, str) else list(self.config.input)

    def input_tables(self):
        if isinstance(self.config.input, str):
            return [(("input",), self.config.input)]
        return [(("input", i), name) for i, name in enumerate(self.config.input)]

    def _module_file(self, env: Env) -> Path:
        module, sep, func = self.config.function.partition(":")
        if not sep or not module or not func:
            raise FieldError("function", f"expected 'module:function', found {self.config.function!r}")
        with _spec_dir_on_path(env.base_dir):
            try:
                found = importlib.util.find_spec(module)
            except (ImportError, ValueError):
                found = None
        if found is None or not found.origin or not Path(found.origin).is_file():
            raise FieldError("function", f"module '{module}' not found next to the spec ({env.base_dir}) or on sys.path")
        return Path(found.origin)

    def check(self, env: Env) -> None:
        self._module_file(env)

    def key_material(self, env: Env) -> dict:
        # Editing the function's module must invalidate the cache.
        return {"module_sha256": hash_file(self._module_file(env))}

    def run(self, ctx) -> None:
        import polars as pl

        module_name, _, func_name = self.config.function.partition(":")
        with _spec_dir_on_path(ctx.env.base_dir):
            # reload: the module may have been edited since this process first imported it
            module = importlib.reload(importlib.import_module(module_name))
        func = getattr(module, func_name, None)
        if not callable(func):
            raise AttributeError(f"{module_name} has no function '{func_name}'")
        if isinstance(self.config.input, str):
            result = func(ctx.read(self.config.input), **self.config.args)
        else:
            result = func(**{name: ctx.read(name) for name in self.config.input}, **self.config.args)
        if isinstance(result, pl.LazyFrame):
            result = result.collect()
        if not isinstance(result, pl.DataFrame):
            where = inspect.getsourcefile(func) or module_name
            raise TypeError(f"{self.config.function} ({where}) returned {type(result).__name__}, expected a polars DataFrame")
        ctx.write(result)


@contextmanager
def _spec_dir_on_path(base_dir: Path):
    sys.path.insert(0, str(base_dir))
    try:
        yield
    finally:
        sys.path.remove(str(base_dir))
