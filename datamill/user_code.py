"""A function a spec names as `module:function`: a `polars` step's function, a `select` step's
own method.

A spec may only name functions from
- modules in its own folder, or in the folders its `code:` lists (a .py file or a package
  directory directly inside one of them; `pkg.mod` for a module inside a package), or
- installed datamill plugins: the exact `module:attr` of an entry point in a `datamill.*` group.

Anything else (`subprocess:getoutput`, `os:system`, `builtins:eval`) is refused: a spec is data,
and reading one must not be able to run arbitrary installed code. A module is found without
importing it, searching only those folders (never sys.path), and is then imported from that very
file under a private name (`datamill.spec_code.<module>`), so that a spec's `select.py` neither
runs the standard library's `select` nor replaces it in sys.modules.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PRIVATE_PACKAGE = "datamill.spec_code"  # spec modules live in sys.modules under this prefix
_importing = threading.Lock()  # a sweep's points may load their functions from several threads


class UserCodeError(ValueError):
    """The reference is malformed or names something a spec may not call."""


def is_reference(text: str) -> bool:
    return ":" in text


@dataclass
class _Found:
    """Where a reference's code is: a module in an allowed folder, or an installed plugin."""

    module: str
    function: str
    file: Path
    parts: list[tuple[str, importlib.machinery.ModuleSpec]] | None = None  # module path in a folder
    plugin: object = None  # the importlib.metadata EntryPoint


def module_file(ref: str, env) -> Path:
    """The source file of `module` in `module:function` (cheap: finds, does not import).
    Raises UserCodeError when the spec may not call it."""
    return _find(ref, env).file


def load_function(ref: str, env):
    """Import the function; a module of the spec's own is executed afresh from its file on every
    call (it may have been edited since the last run)."""
    found = _find(ref, env)
    if found.plugin is not None:
        return found.plugin.load()
    with _importing, folders_on_path(allowed_folders(env)):
        module = _import_from_files(found.parts)
    func = getattr(module, found.function, None)
    if not callable(func):
        raise UserCodeError(f"{found.file} has no function '{found.function}'")
    return func


def allowed_folders(env) -> list[Path]:
    """The spec's folder, then its `code:` folders, in the order a module is looked up."""
    return [Path(env.base_dir), *env.code_dirs]


def outside_allowed_folders(path: Path, env) -> str | None:
    """Why `path` may not hold code a spec runs (it is outside the spec's folder and its `code:`
    folders), or None. For folders whose files can name Python, such as lm-eval task YAMLs."""
    folders = allowed_folders(env)
    if any(Path(path).resolve().is_relative_to(Path(f).resolve()) for f in folders):
        return None
    return (f"{path} is outside the spec's folder ({folders[0]}) and its `code:` folders: files there may "
            "run Python (a task YAML's `!function`), so a spec may only use them from its own folders; "
            "list the folder under `code:` to allow it")


def check_code_folder(folder: str, path: Path) -> str | None:
    """Why the `code:` entry `folder` (resolved: `path`) is unusable, or None."""
    if not path.exists():
        return f"folder '{folder}' does not exist ({path})"
    if not path.is_dir():
        return f"'{folder}' is not a folder ({path})"
    return None


def _find(ref: str, env) -> _Found:
    module, sep, function = ref.partition(":")
    names = module.split(".")
    if not sep or not all(n.isidentifier() for n in names) or not function.isidentifier():
        raise UserCodeError(f"expected 'module:function' (Python names, e.g. transforms:keep_short), found {ref!r}")
    folders = allowed_folders(env)
    for folder in folders:
        parts = _find_in_folder(names, folder)
        if parts:
            return _Found(module, function, Path(parts[-1][1].origin), parts=parts)
    plugin = _plugin_entry_point(module, function)
    if plugin is not None:
        try:
            found = importlib.util.find_spec(module)  # installed code: sys.path is where it lives
        except ImportError:
            found = None
        if found is None or not found.origin or not Path(found.origin).is_file():
            raise UserCodeError(f"'{ref}' is a datamill plugin's entry point ({plugin.group} {plugin.name}), "
                                f"but its module '{module}' is not installed")
        return _Found(module, function, Path(found.origin), plugin=plugin)
    code = f" ({', '.join(str(f) for f in folders[1:])})" if len(folders) > 1 else ""
    raise UserCodeError(f"'{ref}' is not allowed: a spec may call functions from modules in its own folder "
                        f"({folders[0]}) or the folders listed in `code:`{code}, or installed datamill plugins "
                        f"(entry points datamill.*); '{module}' is not one of them")


def _find_in_folder(names: list[str], folder: Path) -> list[tuple[str, importlib.machinery.ModuleSpec]] | None:
    """The spec of each of `a`, `a.b`, `a.b.c` found inside `folder` only, or None. Imports nothing."""
    parts = []
    for i, name in enumerate(names):
        dotted = ".".join(names[: i + 1])
        spec = importlib.machinery.PathFinder.find_spec(dotted, [str(folder)])
        if spec is None:
            return None
        folder = folder / name  # where a submodule of this package is
        if not (spec.origin and Path(spec.origin).is_file()):
            # A package folder without __init__.py. Its own spec would recompute the folder from
            # sys.path when sys.path changes: keep the folder found here instead.
            spec = importlib.machinery.ModuleSpec(dotted, None, is_package=True)
            spec.submodule_search_locations = [str(folder)]
        parts.append((dotted, spec))
    return parts if parts[-1][1].origin else None  # a bare folder has no function to call


def _plugin_entry_point(module: str, function: str):
    from importlib.metadata import entry_points

    eps = entry_points()
    for group in eps.groups:
        if group.startswith("datamill."):
            for ep in eps.select(group=group):
                if ep.module == module and ep.attr == function:
                    return ep
    return None


def _import_from_files(parts: list[tuple[str, importlib.machinery.ModuleSpec]]):
    """Execute `a`, `a.b`, ... from the files found, as datamill.spec_code.a, datamill.spec_code.a.b."""
    # Forget the spec modules imported before, so that what these import relatively (`from . import
    # helpers`) is run afresh too: any of them may have been edited since.
    for name in [n for n in sys.modules if n.startswith(PRIVATE_PACKAGE + ".")]:
        del sys.modules[name]
    module = None
    for dotted, found in parts:
        name = f"{PRIVATE_PACKAGE}.{dotted}"
        if found.origin:
            spec = importlib.util.spec_from_file_location(name, found.origin,
                                                          submodule_search_locations=found.submodule_search_locations)
        else:
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = found.submodule_search_locations
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: dataclasses and relative imports look it up
        try:
            if spec.loader is not None:
                spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    return module


@contextmanager
def folders_on_path(folders: list[Path]):
    """The allowed folders on sys.path while a module runs, so that it can import its neighbours."""
    entries = [str(f) for f in folders]
    sys.path[:0] = entries
    try:
        yield
    finally:
        for entry in entries:
            sys.path.remove(entry)
