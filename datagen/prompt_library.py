"""Generator prompt files: loading, validation, the random index injection and rendering.

A generator prompt is a small YAML file (the shipped library is `datagen/prompts/*.yaml`;
users point `prompts:` at their own files):

    name: academic                 # shown in the `gen_prompt` column (default: the file name)
    family: generator_nested       # static | conditional | generator_conditional | generator_nested
    category: academic             # the GenQA split it feeds (`category` column; default: name)
    num_topics: 40                 # generator families: how many topics the model lists
    num_subtopics: 20              # generator_nested: how many subtopics of the chosen topic
    topics: [algebra, geometry]    # conditional: the fixed list the injected index picks from
    system: You are ...            # optional system message
    template: |                    # Jinja (undefined variables are errors)
      List {{ num_topics }} subjects ... take subject #{{ index }} ...
    parser: qa                     # qa | multiple_choice | dialog | code  (datagen/parsing.py)

The four families (GenQA): `static` asks for an example directly (diversity from sampling
only); `conditional` injects `{{ topic }}`, drawn in code from `topics`; `generator_conditional`
asks the model to list topics and use the one at `{{ index }}`; `generator_nested` also asks
for subtopics of it and uses the one at `{{ subindex }}`. Models do not pick "at random"
uniformly, so the index is drawn in code: request k of a run with seed s draws from
`random.Random(f"{s}:{k}")`, the same in every process and whatever the number of requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from datagen.parsing import ParserName
from datamill.errors import did_you_mean
from datamill.hashing import hash_obj

LIBRARY_DIR = Path(__file__).resolve().parent / "prompts"
FAMILIES = ("static", "conditional", "generator_conditional", "generator_nested")

# Variables a template of each family may use (and, for the index ones, must use).
_VARIABLES = {
    "static": set(),
    "conditional": {"index", "topic", "num_topics"},
    "generator_conditional": {"index", "num_topics"},
    "generator_nested": {"index", "subindex", "num_topics", "num_subtopics"},
}
_REQUIRED = {"static": set(), "conditional": {"topic"}, "generator_conditional": {"index"},
             "generator_nested": {"index", "subindex"}}


class PromptError(ValueError):
    """A prompt name that is not in the library, a missing file, or a malformed prompt file."""


class PromptFile(BaseModel):
    """The fields of a generator prompt file."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: Optional[str] = None
    """Name in the `gen_prompt` column. Default: the file name without .yaml."""
    family: Literal["static", "conditional", "generator_conditional", "generator_nested"]
    """How diversity is injected (see the module docstring)."""
    category: Optional[str] = None
    """The GenQA split this prompt feeds (`category` column). Default: the name."""
    description: Optional[str] = None
    """Free text for people."""
    num_topics: Optional[int] = Field(None, ge=1, le=100_000)
    """Generator families: how many topics the model is asked to list (the index is drawn in 1..num_topics)."""
    num_subtopics: Optional[int] = Field(None, ge=1, le=100_000)
    """generator_nested: how many subtopics (the subindex is drawn in 1..num_subtopics)."""
    topics: Optional[list[str]] = None
    """conditional: the fixed topic list; `{{ topic }}` is the one at the drawn index."""
    system: Optional[str] = None
    """Optional system message (Jinja, same variables as the template)."""
    template: str
    """The user message (Jinja, undefined variables are errors)."""
    parser: ParserName
    """How the model's output becomes messages: a parser of datagen/parsing.py (qa, multiple_choice,
    dialog, code) or one you registered there."""

    @model_validator(mode="after")
    def _family_fields(self):
        fam = self.family
        if fam == "conditional":
            if not self.topics:
                raise ValueError("family 'conditional' needs a non-empty `topics:` list")
            if any(not str(t).strip() for t in self.topics):
                raise ValueError("`topics:` has an empty entry")
            if self.num_topics is not None and self.num_topics != len(self.topics):
                raise ValueError(f"num_topics={self.num_topics} but `topics:` has {len(self.topics)} entries "
                                 "(leave num_topics out for conditional prompts)")
        elif self.topics is not None:
            raise ValueError(f"`topics:` is only used by family 'conditional' (this one is '{fam}')")
        if fam.startswith("generator") and self.num_topics is None:
            raise ValueError(f"family '{fam}' needs `num_topics:` (how many topics the model lists)")
        if fam == "generator_nested" and self.num_subtopics is None:
            raise ValueError("family 'generator_nested' needs `num_subtopics:`")
        if fam != "generator_nested" and self.num_subtopics is not None:
            raise ValueError(f"`num_subtopics:` is only used by family 'generator_nested' (this one is '{fam}')")
        if fam == "static" and self.num_topics is not None:
            raise ValueError("`num_topics:` is not used by family 'static'")
        return self


@dataclass(frozen=True)
class Draw:
    """What request k injects into its prompt."""

    index: int | None
    subindex: int | None
    topic: str | None


@dataclass(frozen=True)
class GeneratorPrompt:
    """A validated prompt file, ready to draw indices and render requests."""

    spec: PromptFile
    name: str
    category: str
    hash: str  # of the validated content: comments and formatting do not change it
    path: Path

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def parser(self) -> str:
        return self.spec.parser

    @property
    def num_topics(self) -> int | None:
        return len(self.spec.topics) if self.spec.family == "conditional" else self.spec.num_topics

    def draw(self, seed: int, k: int) -> Draw:
        """The index (and subindex) request k injects: uniform, and the same in every process
        because the RNG is seeded with a string, not Python's salted hash."""
        if self.family == "static":
            return Draw(None, None, None)
        rng = random.Random(f"{seed}:{k}")
        index = rng.randint(1, self.num_topics)
        if self.family == "conditional":
            return Draw(index, None, self.spec.topics[index - 1])
        subindex = rng.randint(1, self.spec.num_subtopics) if self.family == "generator_nested" else None
        return Draw(index, subindex, None)

    def variables(self, draw: Draw) -> dict:
        values = {"index": draw.index, "subindex": draw.subindex, "topic": draw.topic,
                  "num_topics": self.num_topics, "num_subtopics": self.spec.num_subtopics}
        return {k: values[k] for k in _VARIABLES[self.family]}

    def render(self, draw: Draw) -> list[dict]:
        """Chat messages for one request: optional system message, then the user message."""
        values = self.variables(draw)
        messages = []
        if self.spec.system:
            messages.append({"role": "system", "content": _compile(self.spec.system).render(values).strip()})
        messages.append({"role": "user", "content": _compile(self.spec.template).render(values).strip()})
        return messages


@lru_cache(maxsize=256)
def _compile(source: str):
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)
    return env.from_string(source)


def library_names() -> list[str]:
    """Names of the shipped prompts (files in datagen/prompts/)."""
    return sorted(p.stem for p in LIBRARY_DIR.glob("*.yaml"))


def is_path(entry: str) -> bool:
    """`academic` is a library name; `prompts/mine.yaml`, `./x.yml`, `/abs/x.yaml` are files."""
    return entry.endswith((".yaml", ".yml")) or "/" in entry or "\\" in entry


def resolve(entry: str, base_dir: Path) -> Path:
    """The file a `prompts:` entry names; raises PromptError (with did-you-mean) if there is none."""
    return resolve_entry(entry, base_dir, LIBRARY_DIR, "prompt", "library", PromptError)


def resolve_entry(entry: str, base_dir: Path, library: Path, what: str, shipped: str,
                  error: type[Exception]) -> Path:
    """A library name (a YAML file in `library`) or a path relative to the spec's folder -> the
    file; `error` (with did-you-mean over the library's names) if there is none. Shared by
    generator prompts and judge templates."""
    entry = str(entry).strip()
    if not entry:
        raise error(f"empty {what} name")
    if is_path(entry):
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else Path(base_dir) / path
        if not path.is_file():
            raise error(f"{what} file '{entry}' does not exist (looked at {path.resolve()})")
        return path.resolve()
    path = Path(library) / f"{entry}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in Path(library).glob("*.yaml"))
        raise error(f"unknown {what} '{entry}'{did_you_mean(entry, names)} ({shipped}: {', '.join(names)}; "
                    "or give the path of your own .yaml file)")
    return path


def load(entry: str, base_dir: Path) -> GeneratorPrompt:
    """Resolve, read and validate one `prompts:` entry."""
    return load_file(resolve(entry, base_dir))


def read_yaml_model(path: Path, model, what: str, holds: str, error: type[Exception]):
    """A YAML file validated by a pydantic `model`; any problem is `error` with a message naming
    `what` ("prompt file"), the file and each bad key (with a "did you mean" for unknown ones).
    `holds` says what the mapping must hold. Shared by generator prompts and judge templates."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {what} {path}: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} must be a mapping with {holds}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key{did_you_mean(where, model.model_fields)}"
            problems.append(f"{where}: {msg}" if where else msg)
        raise error(f"{what} {path}: " + "; ".join(problems)) from None


def load_file(path: Path) -> GeneratorPrompt:
    spec = read_yaml_model(path, PromptFile, "prompt file", "family, template and parser", PromptError)
    name = spec.name or Path(path).stem
    prompt = GeneratorPrompt(spec=spec, name=name, category=spec.category or name,
                             hash=hash_obj(spec.model_dump(mode="json")), path=Path(path))
    _check_template(prompt, path)
    return prompt


def _check_template(prompt: GeneratorPrompt, path: Path) -> None:
    """Syntax, variables the family does not provide, and index variables the template never uses
    (a generator prompt that ignores its index gives the same request every time)."""
    import jinja2
    from jinja2 import meta

    env = jinja2.Environment()
    used: set[str] = set()
    for field in ("system", "template"):
        source = getattr(prompt.spec, field)
        if not source:
            continue
        try:
            used |= meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateSyntaxError as e:
            raise PromptError(f"prompt file {path}: {field}: Jinja syntax error on line {e.lineno}: {e.message}") from None
    allowed = _VARIABLES[prompt.family]
    unknown = sorted(used - allowed)
    if unknown:
        offer = ", ".join(sorted(allowed)) or "none"
        raise PromptError(f"prompt file {path}: template uses {', '.join(unknown)}, which family "
                          f"'{prompt.family}' does not provide (variables: {offer})")
    missing = sorted(_REQUIRED[prompt.family] - used)
    if missing:
        raise PromptError(f"prompt file {path}: family '{prompt.family}' injects {', '.join(missing)} "
                          f"but the template never uses {' or '.join('{{ ' + m + ' }}' for m in missing)}")
    try:
        prompt.render(prompt.draw(0, 0))
    except jinja2.TemplateError as e:
        raise PromptError(f"prompt file {path}: cannot render the template: {e}") from None
