"""The Python API behind the CLI: load -> plan -> execute."""

from __future__ import annotations

from pathlib import Path

from datamill import progress
from datamill.errors import SpecError
from datamill.spec import LoadedSpec, load_spec, parse_overrides
from datamill.yaml_source import parse_yaml


def load(spec, overrides: list[str] | None = None) -> LoadedSpec:
    """A spec from a file path, or from a dict (relative paths then resolve against the cwd)."""
    if isinstance(spec, dict):
        import yaml

        # Through YAML like a file, so that positions, duplicate checks and size limits apply alike.
        try:
            text = yaml.safe_dump(spec, sort_keys=False)
        except yaml.YAMLError as e:  # e.g. a Path or a set among the values
            raise SpecError(f"<spec dict>: a spec dict may hold only str, int, float, bool, None, "
                            f"lists and dicts: {e}") from None
        loaded = LoadedSpec(doc=parse_yaml(text, "<spec dict>"),
                            path=Path.cwd() / "<spec dict>", overrides=parse_overrides(overrides or []))
        return loaded
    if not isinstance(spec, (str, Path)):
        raise SpecError(f"expected a spec path or dict, found {type(spec).__name__}")
    return load_spec(spec, overrides)


def plans(spec, overrides: list[str] | None = None):
    from datamill.plan import build_plan

    return [build_plan(point) for point in load(spec, overrides).points()]


def run(spec, overrides: list[str] | None = None, *, quiet: bool = False):
    from datamill.executor import execute

    progress.set_quiet(quiet)
    return execute(plans(spec, overrides))
