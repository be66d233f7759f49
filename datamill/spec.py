"""The spec: pydantic models, loading with --set overrides, and whole-spec checks.

    load_spec(path, overrides)  -> LoadedSpec  (raw YAML + where each value came from)
    loaded.points()             -> one ResolvedSpec per sweep point (one when no sweep)

Every problem becomes one line `file:line:col: dotted.path: what was expected, what was
found`, collected into a SpecError (exit code 2).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import product
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from datamill import registry
from datamill.errors import FieldError, ModelError, SpecError, did_you_mean
from datamill.step import Env, Step
from datamill.yaml_source import YamlDoc, load_yaml, parse_value

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class TrackingConfig(Strict):
    """Where runs are logged (MLflow)."""

    enabled: bool = True
    """Log runs to MLflow. Off: the pipeline still runs and caches, nothing is logged."""
    uri: Optional[str] = None
    """MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///<workspace parent>/mlflow.db."""
    experiment: Optional[str] = None
    """MLflow experiment name. Default: the spec name."""
    tracker: registry.TRACKERS.name_type() = "mlflow"  # type: ignore[valid-type]
    """Which tracker receives the runs: `mlflow` (built in), or one a plugin registers
    (entry-point group `datamill.trackers`, see docs/EXTENDING.md). It is given `uri` and the
    artifact folder."""


class ExecutorConfig(Strict):
    """Where shardable steps run their shards (generation requests, scoring slices). Not part of
    any step's key: the same spec gives the same tables on either."""

    kind: Literal["local", "ray"] = "local"
    """`local`: in this process. `ray`: each shard a Ray task (needs `pip install 'datamill[ray]'`)."""
    address: Optional[str] = None
    """Ray cluster: none starts a local instance (or uses one already started in this process);
    `auto` joins the running cluster; `ray://host:10001` a remote one."""
    num_cpus: float = Field(1, gt=0)
    """CPUs each shard's task asks Ray for."""
    num_gpus: float = Field(0, ge=0)
    """GPUs each shard's task asks Ray for."""
    max_retries: int = Field(3, ge=0)
    """Times Ray re-runs a shard whose worker died."""


def _step_entry_model():
    """A model with one optional field per registered step kind; exactly one must be set."""
    kinds = registry.step_kinds()
    fields = {}
    for kind in kinds:
        cls = registry.step_class(kind)
        doc = (cls.__doc__ or "").strip().splitlines()
        fields[kind] = (Optional[cls.Config], Field(None, description=doc[0] if doc else None))

    def exactly_one_kind(self):
        chosen = [k for k in kinds if getattr(self, k) is not None]
        if len(chosen) != 1:
            found = ", ".join(chosen) if chosen else "none"
            raise ValueError(f"a step needs exactly one kind (one of: {', '.join(kinds)}); found {found}")
        return self

    return create_model(
        "StepEntry",
        __config__=ConfigDict(extra="forbid"),
        __doc__="One step: a single key naming its kind, e.g. `sql: \"SELECT ...\"` or `dedup: {input: pool}`.",
        __validators__={"_one_kind": model_validator(mode="after")(exactly_one_kind)},
        **fields,
    )


def spec_model() -> type[BaseModel]:
    """The Spec model, built from the registry (so plugins' step kinds are part of it)."""
    return _spec_model(tuple(registry.step_kinds()))


_GENERATOR_TAGS: dict[str, type] = {}  # union tag -> config model, for 'did you mean' inside sources


def _source_entry_type(kinds: tuple[str, ...]):
    """A source is a file/hub `source` config, or `{generator: <kind>, ...}` for a step kind that
    makes a table from nothing (Step.source_generator), e.g. the offline task families."""
    from typing import Annotated, Union

    from pydantic import Discriminator, Tag

    members = [Annotated[registry.step_class("source").Config, Tag("<file>")]]
    for kind in kinds:
        cls = registry.step_class(kind)
        if not getattr(cls, "source_generator", False):
            continue
        model = create_model(f"{cls.Config.__name__}Source", __base__=cls.Config,
                             generator=(Literal[kind], Field(description=f"Make this table with the `{kind}` step.")))
        _GENERATOR_TAGS[f"<generator:{kind}>"] = model
        members.append(Annotated[model, Tag(f"<generator:{kind}>")])

    def pick(value):
        generator = value.get("generator") if isinstance(value, dict) else getattr(value, "generator", None)
        return f"<generator:{generator}>" if generator is not None else "<file>"

    return Annotated[Union[tuple(members)], Discriminator(pick)]


def generator_kinds() -> list[str]:
    return [k for k in registry.step_kinds() if getattr(registry.step_class(k), "source_generator", False)]


@lru_cache(maxsize=4)
def _spec_model(kinds: tuple[str, ...]) -> type[BaseModel]:
    source_entry = _source_entry_type(kinds)
    step_entry = _step_entry_model()

    class Spec(Strict):
        """A datamill spec: tables in, steps that make new tables and models, where to log."""

        name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
        """Name of the experiment; also the workspace folder and the MLflow experiment."""
        description: Optional[str] = None
        """Free text shown in MLflow."""
        workspace: Optional[str] = None
        """Folder for the step cache and catalog. Default: .datamill/<name> next to the spec."""
        models: dict[str, str] = {}
        """Model names used by steps -> reference: builtin:smollm2-135m-instruct, builtin:tiny-llama, a local HF folder, or a hub id."""
        code: list[str] = []
        """Folders of your own Python (relative to the spec's folder) whose modules `module:function`
        may name (polars functions, select methods), besides the spec's own folder. A spec may
        call nothing else but installed datamill plugins (entry points datamill.*)."""
        sources: dict[str, source_entry] = {}  # type: ignore[valid-type]
        """Input tables by name: {path: data.jsonl}, {hf: dataset/name}, or a generator step such as
        {generator: tasks, families: [arithmetic], n: 100}."""
        steps: dict[str, step_entry] = {}  # type: ignore[valid-type]
        """Steps by name; each names its kind (sql, polars, dedup, ...) and reads earlier tables by name."""
        tracking: TrackingConfig = TrackingConfig()
        """MLflow settings."""
        executor: ExecutorConfig = ExecutorConfig()
        """Where shardable steps run: local (default) or a Ray cluster."""
        sweep: Optional[dict[str, Any]] = None
        """Dotted field paths -> lists of values: one run per combination (grid), or paired with `mode: zip`.
        `seeds: {steps.sft.train.seed: [0, 1, 2]}` runs every point once per seed (several paths are
        zipped) and compares each point as its mean over seeds, with an interval over seeds and examples."""

    return Spec


def json_schema() -> dict:
    schema = spec_model().model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "datamill spec"
    return schema


# --------------------------------------------------------------------------- loading


@dataclass
class Override:
    path: tuple
    raw: str  # as typed after '='
    origin: str  # "--set a.b=1" or "sweep a.b"


@dataclass
class ResolvedSpec:
    """A validated spec for one sweep point."""

    spec: Any  # the Spec model instance
    raw: dict  # the data it was validated from (after overrides)
    path: Path
    env: Env
    point: dict[str, Any] = field(default_factory=dict)  # sweep path -> value
    label: str = ""
    seed_keys: tuple[str, ...] = ()  # the paths of `point` from `sweep.seeds`: replicates, averaged in comparisons

    @property
    def workspace_root(self) -> Path:
        ws = self.spec.workspace or f".datamill/{self.spec.name}"
        return (self.env.base_dir / ws).resolve()

    def step_objects(self) -> dict[str, Step]:
        """Every source and step as a Step instance, by name."""
        out: dict[str, Step] = {}
        for name, cfg in self.spec.sources.items():
            out[name] = registry.step_class(getattr(cfg, "generator", "source"))(name, cfg)
        for name, entry in self.spec.steps.items():
            kind, cfg = _kind_of(entry)
            out[name] = registry.step_class(kind)(name, cfg)
        return out


@dataclass
class LoadedSpec:
    doc: YamlDoc
    path: Path
    overrides: list[Override]

    def sweep_points(self) -> list[dict[str, Any]]:
        """The sweep's points as {dotted path: value}; [{}] when there is no sweep."""
        data = self.doc.data
        sweep = _apply(data, self.overrides, self.doc).get("sweep") if isinstance(data, dict) else None
        if not sweep:
            return [{}]

        def where(loc: tuple) -> str:  # the file's line, or the --set that put the value there
            return _where(loc, self.doc, self.overrides)

        if not isinstance(sweep, dict):
            raise SpecError(f"{where(('sweep',))}: sweep: expected a mapping of dotted paths to lists, "
                            f"found {_show(sweep)}")
        sweep = dict(sweep)
        mode = sweep.pop("mode", "grid")
        seeds = sweep.pop("seeds", None)
        problems = []
        if seeds is not None:
            if not isinstance(seeds, dict) or not seeds:
                problems.append(f"{where(('sweep', 'seeds'))}: sweep.seeds: expected a mapping of dotted paths to "
                                f"lists of seeds, e.g. {{steps.sft.train.seed: [0, 1, 2]}}; found {_show(seeds)}")
                seeds = None
            else:
                for key, values in seeds.items():
                    if not isinstance(values, list) or not values:
                        problems.append(f"{where(('sweep', 'seeds', key))}: sweep.seeds.{key}: expected a non-empty "
                                        f"list of seeds, found {values!r}")
                if not problems and len({len(v) for v in seeds.values()}) > 1:
                    problems.append(f"{where(('sweep', 'seeds'))}: sweep.seeds: its paths are zipped and need lists "
                                    "of equal length")
                for key in seeds:
                    if key in sweep:
                        problems.append(f"{where(('sweep', 'seeds', key))}: sweep.seeds.{key}: also swept outside "
                                        "`seeds`: sweep it in one place")
        if mode not in ("grid", "zip"):
            problems.append(f"{where(('sweep', 'mode'))}: sweep.mode: expected 'grid' or 'zip', found {mode!r}")
        for key, values in sweep.items():
            if not isinstance(values, list) or not values:
                problems.append(f"{where(('sweep', key))}: sweep.{key}: expected a non-empty list of values, found {values!r}")
            elif str(key).split(".")[0] in ("sweep", "name", "workspace", "tracking"):
                problems.append(f"{where(('sweep', key))}: sweep.{key}: cannot sweep over '{str(key).split('.')[0]}'")
        if not problems and mode == "zip" and len({len(v) for v in sweep.values()}) > 1:
            lengths = ", ".join(f"{k}: {len(v)}" for k, v in sweep.items())
            problems.append(f"{where(('sweep',))}: sweep: mode zip needs lists of equal length; found {lengths}")
        if problems:
            raise SpecError(problems)
        keys = list(sweep)
        combos = zip(*sweep.values()) if mode == "zip" else product(*sweep.values())
        points = [dict(zip(keys, combo)) for combo in combos]
        if seeds:
            replicates = [dict(zip(seeds, combo)) for combo in zip(*seeds.values())]
            points = [{**point, **replicate} for point in points for replicate in replicates]
        return points

    def seed_keys(self) -> tuple[str, ...]:
        """The dotted paths under `sweep.seeds` (checked by `sweep_points`)."""
        data = self.doc.data
        sweep = _apply(data, self.overrides, self.doc).get("sweep") if isinstance(data, dict) else None
        seeds = sweep.get("seeds") if isinstance(sweep, dict) else None
        return tuple(str(k) for k in seeds) if isinstance(seeds, dict) else ()

    def points(self) -> list[ResolvedSpec]:
        points = self.sweep_points()
        labels = point_labels(points)
        seed_keys = self.seed_keys()
        resolved = []
        for point, label in zip(points, labels):
            sweep_overrides = [Override(tuple(str(k).split(".")), v, f"sweep {k}") for k, v in point.items()]
            resolved.append(self._resolve(self.overrides + sweep_overrides, point, label))
            resolved[-1].seed_keys = seed_keys
        return resolved

    def _resolve(self, overrides: list[Override], point: dict, label: str = "") -> ResolvedSpec:
        data = _apply(self.doc.data, overrides, self.doc)
        if not isinstance(data, dict):
            raise SpecError(f"{self.doc.file}: expected a mapping at the top level, found {type(data).__name__}")
        model = spec_model()
        try:
            spec = model.model_validate(data)
        except ValidationError as e:
            # A --set value typed like a number but meant as text: retry those as strings.
            retry = [o for o in overrides if _override_failed_as_typed(o, e)]
            if not retry:
                raise SpecError(_format_validation(e, self.doc, overrides, model)) from None
            overrides = [Override(o.path, str(o.raw), o.origin) if o in retry else o for o in overrides]
            data = _apply(self.doc.data, overrides, self.doc, typed=lambda o: o not in retry)
            try:
                spec = model.model_validate(data)
            except ValidationError as e2:
                raise SpecError(_format_validation(e2, self.doc, overrides, model)) from None
        base_dir = self.path.parent.resolve()
        env = Env(base_dir=base_dir, code_dirs=tuple((base_dir / Path(c).expanduser()).resolve() for c in spec.code))
        resolved = ResolvedSpec(spec=spec, raw=data, path=self.path, env=env, point=point, label=label)
        for step in resolved.step_objects().values():
            for task, folders in step.eval_tasks(env).items():
                env.eval_tasks[task] = tuple(dict.fromkeys(env.eval_tasks.get(task, ()) + tuple(folders)))
        check_references(resolved, self.doc, overrides)
        if spec.executor.kind == "ray":
            import importlib.util

            from datamill.shards import RAY_EXTRA

            if importlib.util.find_spec("ray") is None:
                raise SpecError(f"{self.doc.where(('executor', 'kind'))}: {RAY_EXTRA}")
        return resolved


def point_labels(points: list[dict]) -> list[str]:
    """Run names of sweep points: "method=zipfit,budget=200". Zip sweeps often set one value in
    several places (said once) and pair a method with its params or an optional setting: lists,
    mappings and nulls are left out when the plain values alone still tell every point apart."""
    def label(point: dict, plain_only: bool) -> str:
        items = [(k, v) for k, v in point.items() if not (plain_only and (v is None or isinstance(v, (dict, list))))]
        return ",".join(dict.fromkeys(f"{str(k).split('.')[-1]}={v}" for k, v in items))

    short = [label(p, plain_only=True) for p in points]
    if all(short) and len(set(short)) == len(short):
        return short
    return [label(p, plain_only=False) for p in points]


def load_spec(path: str | Path, overrides: list[str] | None = None) -> LoadedSpec:
    """Read a spec file and parse `--set a.b.c=value` overrides (applied when resolving)."""
    path = Path(path)
    doc = load_yaml(path)
    _check_top_level(doc)
    return LoadedSpec(doc=doc, path=path, overrides=parse_overrides(overrides or []))


def _check_top_level(doc: YamlDoc) -> None:
    """A spec file is one mapping; say so at line 1 rather than let the schema report a missing `name`."""
    if isinstance(doc.data, dict):
        return
    keys = ", ".join(spec_model().model_fields)
    if doc.data is None and () not in doc.positions:
        raise SpecError(f"{doc.file}:1: the file is empty (only comments/whitespace); a spec is a mapping "
                        f"with at least `name:`, e.g. `name: my_experiment` then `sources:` and `steps:` "
                        f"(keys: {keys})")
    raise SpecError(f"{doc.where(())}: the file holds {_describe(doc.data)}, expected a mapping with keys {keys}")


def parse_overrides(items: list[str]) -> list[Override]:
    parsed = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item}: expected PATH=VALUE, e.g. steps.clean.dedup.exact=false")
        parsed.append(Override(tuple(key.strip().split(".")), value, f"--set {key.strip()}"))
    return parsed


def _typed(o: Override):
    if not isinstance(o.raw, str):
        return o.raw  # sweep values are already typed by YAML
    return parse_value(o.raw, o.origin) if o.raw.strip() else o.raw


def _apply(data, overrides: list[Override], doc: YamlDoc, typed=lambda o: True):
    # The file's data is already bounded (yaml_source limits its expanded size), and deepcopy
    # keeps shared (aliased) parts shared, so copying it per sweep point costs no more than that.
    data = copy.deepcopy(data)
    for o in overrides:
        value = _typed(o) if typed(o) else o.raw
        node = data
        for i, part in enumerate(o.path):
            here = ".".join(o.path[:i]) or "the top level"
            if isinstance(node, list):
                if not (part.isdigit() and int(part) < len(node)):
                    raise SpecError(f"{_blame(o, doc)}: cannot set '{'.'.join(o.path)}': '{here}' is a list of "
                                    f"{len(node)}, so '{part}' must be an index from 0 to {len(node) - 1}")
                part = int(part)
            elif isinstance(node, dict):
                if i < len(o.path) - 1 and node.get(part) is None:
                    node[part] = {}  # a mapping on the way that the file leaves out (or null) is made
                elif i < len(o.path) - 1 and _shorthand(o.path[:i + 1]) and not isinstance(node[part], dict):
                    node[part] = {_shorthand(o.path[:i + 1]): node[part]}  # `sql: "..."` is `sql: {query: ...}`
            else:  # never replace a value of the file to go through it: that is a typo, not a wish
                raise SpecError(f"{_blame(o, doc)}: cannot set '{'.'.join(o.path)}': "
                                f"'{here}' is {_describe(node)}, not a mapping")
            if i == len(o.path) - 1:
                node[part] = value
            else:
                node = node[part]
    return data


def _shorthand(path: tuple) -> str | None:
    """The field a step written in shorthand stands for, at steps.<name>.<kind> (e.g. sql -> query)."""
    if len(path) != 3 or path[0] != "steps" or path[2] not in registry.step_kinds():
        return None
    return registry.step_class(path[2]).Config.__shorthand__


def _describe(value) -> str:
    """'a string ('quickstart')', 'a list', 'null': what a value is, for messages about its shape."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    kind = kinds.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} ({text if len(text) <= 40 else text[:37] + '...'})"


def _override_failed_as_typed(o: Override, error: ValidationError) -> bool:
    if not isinstance(o.raw, str) or _typed(o) == o.raw:
        return False
    return any(tuple(map(str, err["loc"])) == o.path and err["type"].endswith("_type") for err in error.errors())


# --------------------------------------------------------------------------- errors


def _format_validation(error: ValidationError, doc: YamlDoc, overrides: list[Override], model) -> list[str]:
    problems = []
    for err in error.errors():
        tagged = tuple(err["loc"])
        loc = tuple(part for part in tagged if not str(part).startswith("<"))  # drop union tags
        dotted = ".".join(map(str, loc)) or "(top level)"
        kind = err["type"]
        found = err.get("input")
        if kind == "extra_forbidden":
            valid = _valid_keys(model, tagged[:-1])
            msg = f"unknown key '{loc[-1]}'{did_you_mean(loc[-1], valid)}"
            if registry.broken_plugin(str(loc[-1])):
                msg = f"step kind '{loc[-1]}' failed to import: {registry.broken_plugin(str(loc[-1]))}"
            if valid and not did_you_mean(loc[-1], valid):
                msg += f" (valid keys: {', '.join(valid)})"
        elif kind == "union_tag_invalid":
            name = found.get("generator") if isinstance(found, dict) else found
            gens = generator_kinds()
            msg = (f"unknown generator '{name}'{did_you_mean(name, gens)} (generators: {', '.join(gens) or 'none'};"
                   " or use `path:`/`hf:` for files and hub datasets)")
            loc = loc + ("generator",)
            dotted = ".".join(map(str, loc))
        elif kind == "missing":
            msg = f"missing required field '{loc[-1]}'"
        else:
            text = err["msg"]
            text = text[len("Value error, "):] if text.startswith("Value error, ") else text
            expected = text[len("Input should be "):] if text.startswith("Input should be ") else text
            if text.startswith("Input should be "):
                msg = f"expected {expected}, found {_show(found)}"
            elif text.startswith("String should match pattern"):
                msg = f"{text}; found {_show(found)}"
            else:
                msg = text
        problems.append(f"{_where(loc, doc, overrides)}: {dotted}: {msg}")
    return problems


def _show(value) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _where(loc: tuple, doc: YamlDoc, overrides: list[Override]) -> str:
    loc_s = tuple(map(str, loc))
    for o in reversed(overrides):  # the value came from --set or the sweep, not the file:
        # within what the override set, or within a mapping it made because the file had none
        owned = min(len(o.path), _depth_in_file(doc.data, o.path) + 1)
        if loc_s[:owned] == o.path[:owned]:
            return _blame(o, doc, with_value=False)
    return doc.where(loc)


def _blame(o: Override, doc: YamlDoc, with_value: bool = True) -> str:
    """Where an override's problem is reported: `--set a.b=1`, or the sweep key's line and value."""
    if o.origin.startswith("sweep "):
        return f"{doc.where(('sweep', o.origin[len('sweep '):]))} ({o.origin}={o.raw!r})"
    if not with_value:  # the message shows the value found
        return o.origin
    raw = str(o.raw)
    return f"{o.origin}={raw if len(raw) <= 60 else raw[:57] + '...'}"


def _depth_in_file(data, path: tuple) -> int:
    """How many leading parts of an override's `path` name values that the file has."""
    for depth, part in enumerate(path):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return depth
    return len(path)


def _valid_keys(model, loc: tuple) -> list[str]:
    """Field names of the model found at `loc` (for 'did you mean')."""
    import typing

    ann: Any = model
    for part in loc:
        if str(part).startswith("<"):  # a union tag: the member it names
            ann = _GENERATOR_TAGS.get(str(part), ann)
            continue
        ann = _unwrap(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            by_key = {info.alias or name: info for name, info in ann.model_fields.items()}
            info = by_key.get(str(part))
            if info is None:
                return []
            ann = info.annotation
        elif typing.get_origin(ann) is dict:
            ann = typing.get_args(ann)[1]
        elif typing.get_origin(ann) is list:
            ann = typing.get_args(ann)[0]
        else:
            return []
    ann = _unwrap(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [info.alias or name for name, info in ann.model_fields.items()]
    return []


def _unwrap(ann):
    import types
    import typing

    if typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        for arg in typing.get_args(ann):
            if arg is not type(None):
                return arg
    return ann


# --------------------------------------------------------------------------- whole-spec checks


def _kind_of(entry) -> tuple[str, Any]:
    for kind in type(entry).model_fields:
        cfg = getattr(entry, kind)
        if cfg is not None:
            return kind, cfg
    raise AssertionError("validated StepEntry has no kind")


def table_base(name: str) -> str:
    """'clean__removed' -> 'clean' (side tables belong to their step)."""
    return name.split("__", 1)[0]


def split_table(name: str) -> tuple[str, str]:
    """'clean__removed' -> ('clean', 'removed'); 'clean' -> ('clean', 'main')."""
    step, _, side = name.partition("__")
    return step, side or "main"


def side_table(step: str, side: str = "main") -> str:
    """A step's table as the catalog names it: ('clean', 'main') -> 'clean', ('clean', 'removed') -> 'clean__removed'."""
    return step if side == "main" else f"{step}__{side}"


def check_references(resolved: ResolvedSpec, doc: YamlDoc, overrides: list[Override]) -> None:
    """Names, table and model references, files, and cycles; all problems at once."""
    from datamill import models as model_refs
    from datamill.steps.sql import reserved_words
    from datamill.user_code import check_code_folder

    spec, env = resolved.spec, resolved.env
    problems: list[str] = []

    def report(loc: tuple, message: str) -> None:
        problems.append(f"{_where(loc, doc, overrides)}: {'.'.join(map(str, loc))}: {message}")

    def prefix(name: str) -> tuple:
        if name in spec.sources:
            return ("sources", name)
        return ("steps", name, _kind_of(spec.steps[name])[0])

    for section in ("sources", "steps"):
        for name in getattr(spec, section):
            if not NAME_PATTERN.match(name) or "__" in name:
                report((section, name), f"invalid name '{name}': use letters, digits and single underscores "
                                        "(it becomes a SQL table name; '__' is reserved for side tables)")
            elif name.lower() in reserved_words():
                report((section, name), f"'{name}' is a reserved word in DuckDB SQL: rename the "
                                        f"{section[:-1]} (queries would need to quote it as \"{name}\")")
    for name in spec.steps:
        if name in spec.sources:
            report(("steps", name), f"duplicate name '{name}': already defined under sources")

    for i, (folder, path) in enumerate(zip(spec.code, env.code_dirs)):
        problem = check_code_folder(folder, path)
        if problem:
            report(("code", i), problem)

    steps = resolved.step_objects()
    for ref_name, ref in spec.models.items():
        try:
            model_refs.check_reference(ref, env.base_dir)
        except ModelError as e:
            report(("models", ref_name), str(e))

    graph: dict[str, list[str]] = {}
    for name, step in steps.items():
        where = prefix(name)
        try:
            step.check(env)
        except FieldError as e:
            report(where + e.loc, e.message)
        deps = []
        for field_loc, table in step.input_tables():
            base, side = split_table(table)
            side = "" if side == "main" else side
            if base not in steps:
                report(where + tuple(field_loc), f"undefined table '{table}'{did_you_mean(table, steps)}"
                       f" (defined: {', '.join(steps) or 'none'})")
            elif side and side not in steps[base].side_tables:
                has = ", ".join(side_table(base, t) for t in steps[base].side_tables) or "none"
                report(where + tuple(field_loc), f"undefined table '{table}': step '{base}' ({steps[base].kind}) "
                       f"has no side table '{side}' (its side tables: {has})")
            else:
                deps.append(base)
        for field_loc, ref in step.model_refs():
            if ref in spec.models:
                continue
            if ref in steps:
                if not steps[ref].produces_model:
                    report(where + tuple(field_loc), f"step '{ref}' ({steps[ref].kind}) produces no model")
                else:
                    deps.append(ref)
                continue
            if not _looks_like_reference(ref):
                known = list(spec.models) + [n for n, s in steps.items() if s.produces_model]
                report(where + tuple(field_loc), f"undefined model '{ref}'{did_you_mean(ref, known)}"
                       f" (models: {', '.join(known) or 'none'}; or write a reference like builtin:tiny-llama)")
                continue
            try:
                model_refs.check_reference(ref, env.base_dir)
            except ModelError as e:
                report(where + tuple(field_loc), str(e))
        graph[name] = deps

    cycle = find_cycle(graph)
    if cycle:
        report(prefix(cycle[0]), "steps form a cycle: " + " -> ".join(cycle))
    if problems:
        raise SpecError(problems)


def _looks_like_reference(ref: str) -> bool:
    return ref.startswith(("builtin:", ".", "/", "~")) or "/" in ref


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str):
        state[node] = 1
        path.append(node)
        for dep in graph.get(node, []):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def topo_order(graph: dict[str, list[str]]) -> list[str]:
    """Dependencies first; ties keep the spec's order."""
    order: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> None:
        if node in done:
            return
        done.add(node)
        for dep in graph.get(node, []):
            visit(dep)
        order.append(node)

    for node in graph:
        visit(node)
    return order
