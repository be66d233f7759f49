"""Is a response to a task-family question correct? The rule the shipped exact-match evals use.

    is_correct("The capital of Peru is Lima.", "Lima", "capitals")   -> True
    is_correct("12 + 30 = 42, so 42", "42", "arithmetic")            -> True

The answer is pulled out of the response by the family's regex from `datagen/lm_eval_export.py`
(the last integer for arithmetic, the last country/capital/continent for capitals, the first line
for reverse/sort/code, ...) and compared as lm-eval's `exact_match` compares it (ignoring case,
punctuation or the family's characters where the eval does). So "correct" here means what the
`datamill_<family>_exact` task would score as correct: preference pairs built from verified
answers teach exactly what that eval measures. A response is read in full, not cut at its first
newline as `generate_until` would: a sampled answer may explain before it answers.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

FAMILIES_WITHOUT_ANSWER = ("chat",)  # chit-chat has no checkable answer


@lru_cache(maxsize=None)
def _settings(family: str) -> dict:
    from datagen.lm_eval_export import _exact_settings

    settings = dict(_exact_settings(family))
    pattern, group = settings["regex"]
    settings["compiled"] = (re.compile(pattern, re.MULTILINE), group)
    return settings


def extract_answer(response: str, family: str) -> str | None:
    """The family's answer as the exact eval extracts it from `response` (None: nothing found)."""
    compiled, group = _settings(family)["compiled"]
    text = response.strip()
    if group == 0:  # first-line families: the first non-empty line
        text = next((line for line in text.splitlines() if line.strip()), "")
    matches = [m.group(1) if m.groups() else m.group(0) for m in compiled.finditer(text)]
    if not matches:
        return None
    return matches[group]


def _fold(text: str, settings: dict) -> str:
    for pattern in settings["ignore"]:
        text = re.sub(pattern, "", text)
    if settings["ignore_case"]:
        text = text.lower()
    if settings["ignore_punct"]:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text.strip()


def is_correct(response: str, answer: str, family: str) -> bool:
    """Whether `response` states `answer`, by the family's exact-match rule."""
    if family in FAMILIES_WITHOUT_ANSWER:
        raise ValueError(f"the '{family}' family has no checkable answer")
    found = extract_answer(response or "", family)
    if found is None:
        return False
    settings = _settings(family)
    return _fold(found, settings) == _fold(str(answer), settings)
