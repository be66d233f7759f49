"""Turn a nested spec into flat MLflow params (`steps.clean.dedup.threshold` -> "0.8").

Pure Python so it can be used and tested without importing mlflow (a 2 s import). The
limits below mirror `mlflow.utils.validation`; tests check they still match.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterator

MAX_PARAM_VAL_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VAL_LENGTH = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
MAX_ENTITY_KEY_LENGTH = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH (param/metric/tag keys)
MAX_PARAMS_TAGS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH

TRUNCATED_SUFFIX = "…(truncated, see spec.yaml)"

# MLflow accepts alphanumerics, _ - . space / in keys (and ':' except on Windows: drop it so
# a store written on Linux stays readable everywhere). ASCII only, for the same reason.
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


# Stats that say how a step went rather than what it found: its tables' sizes, timings, sharding.
# MlflowTracker.log_step keeps them out of the metrics (see there for why).
_HOUSEKEEPING_PARTS = {"rows", "seconds", "shards", "shard_seconds"}


def is_housekeeping(key: str) -> bool:
    """Whether a dotted stats key ("rows.main", "shard_seconds.max", "train_seconds") is
    bookkeeping (row counts, timings, sharding) rather than a result."""
    parts = key.split(".")
    return any(part in _HOUSEKEEPING_PARTS for part in parts) or parts[-1].endswith("_seconds")


def walk(nested, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, leaf) for every leaf of nested dicts/lists; list items are keyed by index.
    Empty dicts/lists are leaves, so an explicit `{}` in a spec still shows up."""
    if isinstance(nested, dict) and nested:
        items = ((str(k), v) for k, v in nested.items())
    elif isinstance(nested, (list, tuple)) and nested:
        items = ((str(i), v) for i, v in enumerate(nested))
    else:
        yield prefix, nested
        return
    for k, v in items:
        yield from walk(v, f"{prefix}.{k}" if prefix else k)


def to_text(value) -> str:
    """A leaf as text; YAML spellings for bool/None/empty containers so params read like the spec."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, dict, list, tuple)):
        return json.dumps(value if not isinstance(value, tuple) else list(value))
    return str(value)


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - len(TRUNCATED_SUFFIX)] + TRUNCATED_SUFFIX


def sanitize_key(key: str) -> str:
    """A key MLflow accepts: allowed characters only, a path that does not normalise to
    something else (MLflow may store keys as file names), at most 250 characters."""
    clean = _BAD_KEY_CHARS.sub("_", key)
    if not _is_plain_path(clean):
        clean = clean.replace("/", "_").lstrip(".") or "_"
    if len(clean) > MAX_ENTITY_KEY_LENGTH:
        # keep the key unique: a shortened prefix plus a hash of the whole original key
        clean = clean[: MAX_ENTITY_KEY_LENGTH - 9] + "." + _short_hash(key)
    return clean


def _is_plain_path(key: str) -> bool:
    norm = posixpath.normpath(key)
    return norm == key and norm != "." and not norm.startswith(("..", "/"))


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def flatten_params(nested: dict, prefix: str = "") -> tuple[dict[str, str], dict[str, int]]:
    """Flatten nested dicts/lists to `{dotted.key: text}` within MLflow's limits.

    Returns (params, truncated): `truncated` maps each param whose value was cut to
    MAX_PARAM_VAL_LENGTH (it then ends with TRUNCATED_SUFFIX) to its original length.
    Keys that sanitise to the same text get a hash suffix so no value is lost."""
    leaves = list(walk(nested, prefix))
    params: dict[str, str] = {}
    truncated: dict[str, int] = {}
    for key, (_, leaf) in zip(unique_keys([k for k, _ in leaves]), leaves):
        text = to_text(leaf)
        params[key] = truncate(text, MAX_PARAM_VAL_LENGTH)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            truncated[key] = len(text)
    return params, truncated


def unique_keys(raw_keys: list[str]) -> list[str]:
    """Each key sanitised (`sanitize_key`); a key that sanitises to one already taken gets a hash
    of its original text appended, so that no value overwrites another."""
    out, taken = [], set()
    for raw in raw_keys:
        key = sanitize_key(raw)
        if key in taken:
            key = sanitize_key(f"{key}.{_short_hash(raw)}")
        taken.add(key)
        out.append(key)
    return out
