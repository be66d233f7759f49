"""A user's Python function named `module:function`, looked up next to the spec first, then on
sys.path. Used by the `polars` step and by `select` (a selection method of your own)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path


class UserCodeError(ValueError):
    """The reference is malformed or names nothing that can be imported."""


def is_reference(text: str) -> bool:
    return ":" in text


def module_file(ref: str, base_dir: Path) -> Path:
    """The source file of `module` in `module:function` (cheap: finds, does not import)."""
    module, sep, func = ref.partition(":")
    if not sep or not module or not func:
        raise UserCodeError(f"expected 'module:function', found {ref!r}")
    with spec_dir_on_path(base_dir):
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise UserCodeError(f"module '{module}' not found next to the spec ({base_dir}) or on sys.path")
    return Path(found.origin)


def load_function(ref: str, base_dir: Path):
    """Import (re-import: the module may have been edited since) and return the function."""
    module_name, _, func_name = ref.partition(":")
    with spec_dir_on_path(base_dir):
        module = importlib.reload(importlib.import_module(module_name))
    func = getattr(module, func_name, None)
    if not callable(func):
        raise AttributeError(f"{module_name} has no function '{func_name}'")
    return func


@contextmanager
def spec_dir_on_path(base_dir: Path):
    sys.path.insert(0, str(base_dir))
    try:
        yield
    finally:
        sys.path.remove(str(base_dir))
