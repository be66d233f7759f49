"""`polars`: a Python function `module:function` that takes and returns Polars DataFrames."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from datamill.errors import FieldError
from datamill.hashing import hash_file
from datamill.step import Env, Step, StepConfig
from datamill.user_code import UserCodeError, load_function, module_file


class PolarsConfig(StepConfig):
    """Transform tables with your own Python function."""

    function: str
    """`module:function`: a module in the spec's folder or a `code:` folder (`pkg.mod` inside a
    package), or a function an installed datamill plugin exposes as an entry point."""
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
        try:
            return module_file(self.config.function, env)
        except UserCodeError as e:
            raise FieldError("function", str(e)) from None

    def check(self, env: Env) -> None:
        self._module_file(env)

    def key_material(self, env: Env) -> dict:
        # Editing the function's module must invalidate the cache.
        return {"module_sha256": hash_file(self._module_file(env))}

    def run(self, ctx) -> None:
        import polars as pl

        func = load_function(self.config.function, ctx.env)
        if isinstance(self.config.input, str):
            result = func(ctx.read(self.config.input), **self.config.args)
        else:
            result = func(**{name: ctx.read(name) for name in self.config.input}, **self.config.args)
        if isinstance(result, pl.LazyFrame):
            result = result.collect()
        if not isinstance(result, pl.DataFrame):
            where = inspect.getsourcefile(func) or self.config.function
            raise TypeError(f"{self.config.function} ({where}) returned {type(result).__name__}, expected a polars DataFrame")
        ctx.write(result)
