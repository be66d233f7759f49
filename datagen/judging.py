"""Judge templates (loading, validation, rendering) and the parsing of a judge's verdict.

A judge template is a small YAML file (shipped: `datagen/judge_templates/*.yaml`; users point
`template:` at their own file):

    name: helpfulness          # default: the file name
    mode: pointwise            # pointwise (one response, a score) | pairwise (A vs B, a choice)
    scale: [1, 10]             # pointwise: the lowest and highest score
    tie: true                  # pairwise: whether "tie" is a valid verdict
    description: ...           # free text for people
    system: You are ...        # optional system message
    user: |                    # the user message, with {variables} (Python format: {{ }} is a brace)
      [Question] {prompt}  [Answer] {response}  ... End with "Score: <1-10>".
    verdict: score             # score (pointwise) | choice (pairwise): what the parser reads

Variables: `{prompt}` (the conversation before the judged turn, as text) and `{reference}` (the
row's reference answer, `reference:` column) in both modes; `{response}` in pointwise templates,
`{response_a}` and `{response_b}` in pairwise ones, each required there. A variable the mode does
not provide, a required one the template never uses, or a bad brace is an error naming the file
and the variable, raised when the spec is checked, before anything runs.

Verdicts are parsed leniently, since judges rarely follow the format to the letter. Scores:
JSON ({"score": 7, "reason": ...}), a tag ("Score: 7", "**Rating:** 7", "Rating: [[7]]"),
"[[7]]", "7/10", or a bare number; the last tagged one wins (judges reason first, then
conclude). Choices: JSON ({"winner": "A"}), "[[A]]" ("[[C]]" is MT-bench's tie), a tag
("Verdict: B", "Final answer: Response A"), a bare "A"/"B", or the word "tie". A verdict that
cannot be read, or a score outside the scale, raises `VerdictError` with its kind.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, model_validator

from datamill.errors import did_you_mean
from datamill.hashing import hash_obj

LIBRARY_DIR = Path(__file__).resolve().parent / "judge_templates"
DEFAULT_TEMPLATE = {"pointwise": "helpfulness", "pairwise": "pairwise"}
VARIABLES = {"pointwise": {"prompt", "response", "reference"},
             "pairwise": {"prompt", "response_a", "response_b", "reference"}}
REQUIRED = {"pointwise": {"response"}, "pairwise": {"response_a", "response_b"}}
MAX_REASON_CHARS = 2000


class TemplateError(ValueError):
    """A template name not in the library, a missing file, or a malformed template."""


class VerdictError(ValueError):
    """A judge's output without a usable verdict; `kind`: unparseable | out_of_scale | tie_not_allowed."""

    def __init__(self, reason: str, kind: str):
        self.reason, self.kind = reason, kind
        super().__init__(reason)


class TemplateFile(BaseModel):
    """The fields of a judge template file."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: Optional[str] = None
    """Name shown in stats. Default: the file name without .yaml."""
    mode: Literal["pointwise", "pairwise"]
    """pointwise: one response gets a score; pairwise: two responses, a choice (A, B or tie)."""
    description: Optional[str] = None
    """Free text for people."""
    scale: Optional[tuple[float, float]] = None
    """pointwise: the lowest and highest score, e.g. [1, 10]."""
    tie: bool = True
    """pairwise: whether the judge may answer tie."""
    system: Optional[str] = None
    """Optional system message ({variables} as in `user`)."""
    user: str
    """The user message: the task, the {variables}, and the verdict format asked for."""
    verdict: Optional[Literal["score", "choice"]] = None
    """What the parser reads: a score (pointwise) or a choice (pairwise). Default: from the mode."""

    @model_validator(mode="after")
    def _mode_fields(self):
        expected = "score" if self.mode == "pointwise" else "choice"
        if self.verdict is None:
            self.verdict = expected
        elif self.verdict != expected:
            raise ValueError(f"a {self.mode} template's verdict is a {expected}, not a {self.verdict}")
        if self.mode == "pointwise":
            if self.scale is None:
                raise ValueError("a pointwise template needs `scale: [lowest, highest]`")
            if self.scale[0] >= self.scale[1]:
                raise ValueError(f"scale {list(self.scale)}: the lowest score must be below the highest")
        elif self.scale is not None:
            raise ValueError("`scale:` is for pointwise templates (a pairwise judge chooses A, B or tie)")
        return self


@dataclass(frozen=True)
class JudgeTemplate:
    """A validated template, ready to render requests and read verdicts."""

    spec: TemplateFile
    name: str
    hash: str  # of the validated content: comments and formatting do not change it
    path: Path
    variables: frozenset  # the variables it uses

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def uses_reference(self) -> bool:
        return "reference" in self.variables

    @property
    def midpoint(self) -> float:
        low, high = self.spec.scale
        return (low + high) / 2

    def render(self, **values: str) -> list[dict]:
        """Chat messages for one request: optional system message, then the user message."""
        values = {k: "" if v is None else str(v) for k, v in values.items()}
        messages = []
        if self.spec.system:
            messages.append({"role": "system", "content": self.spec.system.format(**values).strip()})
        messages.append({"role": "user", "content": self.spec.user.format(**values).strip()})
        return messages

    def score(self, text: str) -> tuple[float, str]:
        return parse_score(text, *self.spec.scale)

    def choice(self, text: str) -> tuple[str, str]:
        return parse_choice(text, tie=self.spec.tie)


def library_names() -> list[str]:
    """Names of the shipped templates (files in datagen/judge_templates/)."""
    return sorted(p.stem for p in LIBRARY_DIR.glob("*.yaml"))


def resolve(entry: str, base_dir: Path) -> Path:
    """The file a `template:` entry names; raises TemplateError (with did-you-mean) if there is none."""
    from datagen.prompt_library import resolve_entry

    return resolve_entry(entry, base_dir, LIBRARY_DIR, "judge template", "shipped", TemplateError)


def load(entry: str, base_dir: Path) -> JudgeTemplate:
    """Resolve, read and validate one `template:` entry."""
    return load_file(resolve(entry, base_dir))


@lru_cache(maxsize=64)
def _load_cached(path: str, mtime_ns: int) -> JudgeTemplate:
    from datagen.prompt_library import read_yaml_model

    spec = read_yaml_model(Path(path), TemplateFile, "judge template", "mode, user and (pointwise) scale",
                           TemplateError)
    used = _check_variables(spec, path)
    return JudgeTemplate(spec=spec, name=spec.name or Path(path).stem, hash=hash_obj(spec.model_dump(mode="json")),
                         path=Path(path), variables=frozenset(used))


def load_file(path: Path) -> JudgeTemplate:
    path = Path(path)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as e:
        raise TemplateError(f"cannot read judge template {path}: {e}") from None
    return _load_cached(str(path), mtime)


def _check_variables(spec: TemplateFile, path) -> set[str]:
    """The {variables} of system and user: each one the mode provides, the required ones used."""
    used: set[str] = set()
    for field in ("system", "user"):
        source = getattr(spec, field)
        if not source:
            continue
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(source) if name is not None]
        except ValueError as e:
            raise TemplateError(f"judge template {path}: {field}: {e} (write a literal brace as {{{{ or }}}})") from None
        for name in names:
            if not name.isidentifier():
                raise TemplateError(f"judge template {path}: {field}: '{{{name}}}' is not a variable (variables: "
                                    f"{', '.join(sorted(VARIABLES[spec.mode]))}; write a literal brace as {{{{ or }}}})")
        used |= set(names)
    allowed = VARIABLES[spec.mode]
    unknown, missing = sorted(used - allowed), sorted(REQUIRED[spec.mode] - used)
    if unknown:
        name = unknown[0]
        raise TemplateError(f"judge template {path}: uses the variable {{{name}}}, which a {spec.mode} template "
                            f"does not have{did_you_mean(name, allowed)} (variables: {', '.join(sorted(allowed))})")
    if missing:
        raise TemplateError(f"judge template {path}: the variable {{{missing[0]}}} is missing: a {spec.mode} "
                            f"template must show the judge {' and '.join('{' + m + '}' for m in missing)} "
                            "(in `user` or `system`)")
    return used


def conversation_text(messages: list[dict]) -> str:
    """A conversation as the judge reads it: one user turn as its text, more turns with role labels."""
    if not messages:
        return ""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"] or ""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content'] or ''}" for m in messages)


# --- verdicts ----------------------------------------------------------------------------

NUMBER = r"(-?\d+(?:\.\d+)?)"
_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.S)
_SCORE_TAG = re.compile(r"(?i)\b(?:overall\s+)?(?:score|rating|grade)\b[\s*_:=#\-\[(]*?" + NUMBER
                        + r"(?:\s*/\s*\d+(?:\.\d+)?)?")
_SCORE_BRACKETS = re.compile(r"\[\[\s*" + NUMBER + r"\s*\]\]")
_SCORE_FRACTION = re.compile(r"(?<![\w.])" + NUMBER + r"\s*/\s*\d+(?:\.\d+)?(?![\w.])")
_SCORE_BARE = re.compile(r"^\W*?" + NUMBER + r"\W*$")
_CHOICE_BRACKETS = re.compile(r"\[\[\s*(A|B|C|[Tt][Ii][Ee])\s*\]\]")
_CHOICE_TAG = re.compile(
    r"(?i:\b(?:verdict|winner|choice|preference|better(?:\s+response)?|final\s+answer)\b)[\s*_:=#\-\[(]*"
    r"(?:(?i:response|assistant|output|answer)\s+)?\(?(A|B|[Tt][Ii][Ee])\b")
_CHOICE_BARE = re.compile(r"^\W*(?:(?i:response|assistant|output|answer)\s+)?(A|B|[Tt][Ii][Ee])\W*$")
_TIE_WORD = re.compile(r"(?i)\btie\b")
_SCORE_KEYS = ("score", "rating", "grade")
_CHOICE_KEYS = ("winner", "verdict", "choice", "preference", "better")
_REASON_KEYS = ("reason", "reasoning", "explanation", "rationale", "justification")


def _json_verdict(text: str, keys: tuple[str, ...]) -> tuple[object, str | None] | None:
    """(value, reason) from the first JSON object of the text that has one of `keys`."""
    for match in _JSON_OBJECT.finditer(text):
        try:
            obj = json.loads(match.group(0))
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        lowered = {str(k).lower(): v for k, v in obj.items()}
        for key in keys:
            if key in lowered:
                reason = next((str(lowered[k]) for k in _REASON_KEYS if lowered.get(k) is not None), None)
                return lowered[key], reason
    return None


def _reason(text: str, match: re.Match) -> str:
    """The judge's words besides its verdict: the text without the verdict's line when that line
    holds nothing else ("**Score:** 7"), else the whole text ("A is better. Verdict: A")."""
    start = text.rfind("\n", 0, match.start()) + 1
    end = text.find("\n", match.end())
    end = len(text) if end < 0 else end
    rest = text[start:match.start()] + text[match.end():end]
    if not re.search(r"[^\W\d_]", rest):
        text = text[:start] + text[end:]
    return text.strip()[:MAX_REASON_CHARS]


def _last(pattern: re.Pattern, text: str) -> re.Match | None:
    found = None
    for found in pattern.finditer(text):
        pass
    return found


def parse_score(text: str, low: float, high: float) -> tuple[float, str]:
    """(score, reason) of a pointwise verdict (module docstring); VerdictError if none or out of scale."""
    text = text or ""
    score, reason = None, None
    found = _json_verdict(text, _SCORE_KEYS)
    if found is not None:
        try:
            score, reason = float(found[0]), found[1] or ""
        except (TypeError, ValueError):
            score = None
    if score is None:
        for pattern in (_SCORE_TAG, _SCORE_BRACKETS, _SCORE_FRACTION, _SCORE_BARE):
            match = _last(pattern, text)
            if match is not None:
                score, reason = float(match.group(1)), _reason(text, match)
                break
    if score is None:
        raise VerdictError("no score found (expected e.g. 'Score: 7', '7/10' or {\"score\": 7})", "unparseable")
    if not low <= score <= high:
        raise VerdictError(f"score {score:g} is outside the scale {low:g}-{high:g}", "out_of_scale")
    return score, reason


def _choice_value(value) -> str | None:
    word = str(value).strip().strip("*[]().").lower()
    word = re.sub(r"^(?:response|assistant|output|answer)\s+", "", word)
    return {"a": "A", "b": "B", "c": "tie", "tie": "tie"}.get(word)


def parse_choice(text: str, tie: bool = True) -> tuple[str, str]:
    """("A" | "B" | "tie", reason) of a pairwise verdict (module docstring); VerdictError if none."""
    text = text or ""
    choice, reason = None, None
    found = _json_verdict(text, _CHOICE_KEYS)
    if found is not None:
        choice, reason = _choice_value(found[0]), found[1] or ""
    if choice is None:
        for pattern in (_CHOICE_BRACKETS, _CHOICE_TAG, _CHOICE_BARE, _TIE_WORD):
            match = _last(pattern, text)
            if match is not None:
                choice = _choice_value(match.group(1) if match.groups() else match.group(0))
                reason = _reason(text, match)
                if choice is not None:
                    break
    if choice is None:
        raise VerdictError("no verdict found (expected e.g. '[[A]]', 'Verdict: B' or 'tie')", "unparseable")
    if choice == "tie" and not tie:
        raise VerdictError("the judge answered tie, which this template does not allow", "tie_not_allowed")
    return choice, reason
