"""Keep secrets out of MLflow, logs and artifacts.

Two rules: (1) any config field whose name looks like a secret (key, token, secret,
password) is replaced by REDACTED wherever the config is logged or written; (2) any value
a step reads from the environment through `read_secret_env` is remembered and scrubbed from
every string that leaves the process (params, tags, logged spec, error messages).
"""

from __future__ import annotations

import os
import re

REDACTED = "***REDACTED***"
_SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"}
_known_values: set[str] = set()


def is_secret_name(name: str) -> bool:
    """`api_key`, `token`, `hf_token_env`, `password`: yes. `max_tokens`, `keyword`: no.
    Every `*_env` field is treated as secret too: it names where a secret comes from."""
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower())
    return bool(_SECRET_WORDS.intersection(words)) or words[-1] == "env"


def redact_config(obj):
    """A deep copy of a config (dicts/lists) with secret-named fields replaced by REDACTED."""
    if isinstance(obj, dict):
        return {
            k: (REDACTED if is_secret_name(k) and v is not None else redact_config(v))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact_config(v) for v in obj]
    if isinstance(obj, str):
        return scrub(obj)
    return obj


def read_secret_env(var: str) -> str:
    """Read a secret from the environment and remember it so it is scrubbed from all output."""
    value = os.environ.get(var)
    if value is None:
        from datamill.errors import DatamillError

        raise DatamillError(f"environment variable {var} is not set (it should hold a secret)")
    if len(value) >= 4:  # scrubbing one- or two-letter strings would mangle every message
        _known_values.add(value)
    return value


def scrub(text: str) -> str:
    """Replace every remembered secret value in `text`."""
    for value in _known_values:
        if value in text:
            text = text.replace(value, REDACTED)
    return text
