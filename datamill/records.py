"""The canonical instruction schema, defined once, and the normalisation of input rows to it.

Every instruction table has the columns

    id          str   stable content hash of `messages` (first 16 hex of sha256 of its canonical JSON)
    messages    list<struct<role: str, content: str>>, roles system / user / assistant
    source      str   name of the step the row came from
    gen_prompt  str   \
    gen_model   str    | provenance: always present (null when unknown), so that
    gen_seed    int64  | `UNION ALL BY NAME` of any two instruction tables works
    parent_id   str   /

followed by any extra input columns as they were (`family`, `category`, ...).

Accepted input shapes (the first that matches wins):
    messages                          [{role, content}, ...]
    prompt + response (+ system)      one exchange
    instruction + output (+ input)    Alpaca; user = instruction, + "\\n\\n" + input when non-empty
    conversations                     ShareGPT: [{from: human | gpt | system, value}, ...]

Polars is imported lazily (`INSTRUCTION_SCHEMA` and `PROVENANCE` are built on first access)
because this module is imported while specs are validated and planned.
"""

from __future__ import annotations

import json
from typing import Iterable

from datamill.hashing import hash_obj

ROLES = ("system", "user", "assistant")
SHARE_GPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}
PROVENANCE_COLUMNS = ("gen_prompt", "gen_model", "gen_seed", "parent_id")
CANONICAL_COLUMNS = ("id", "messages", "source") + PROVENANCE_COLUMNS
REJECTED_COLUMNS = ("line", "reason", "raw")
MAX_RAW_CHARS = 2000
# The row layouts `normalize_record` accepts, in the order it tries them: (short name, layout).
# Both the "missing field" reason and the note shown when a source rejects rows come from here.
ACCEPTED_SHAPES = (
    ("messages", "{messages: [{role, content}, ...]}"),
    ("prompt+response", "{prompt, response} (+ system)"),
    ("instruction+output", "{instruction, output} (+ input; Alpaca)"),
    ("conversations", "{conversations: [{from, value}, ...]} (ShareGPT)"),
)
EXPECTED_SHAPES = " | ".join(name for name, _ in ACCEPTED_SHAPES)

# Rows are turned into a DataFrame this many at a time: Python dicts cost ~10x their Arrow size.
_CHUNK_ROWS = 50_000


class RecordError(ValueError):
    """A row cannot be normalised; `reason` says why, in words a user can act on."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def __getattr__(name: str):
    # PEP 562: the polars dtypes are built on first use, keeping `import datamill.records` cheap.
    if name == "PROVENANCE":
        import polars as pl

        return {"gen_prompt": pl.String, "gen_model": pl.String, "gen_seed": pl.Int64,
                "parent_id": pl.String}
    if name == "MESSAGES_DTYPE":
        import polars as pl

        return pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
    if name == "INSTRUCTION_SCHEMA":
        import polars as pl

        return {"id": pl.String, "messages": __getattr__("MESSAGES_DTYPE"), "source": pl.String,
                **__getattr__("PROVENANCE")}
    if name == "REJECTED_SCHEMA":
        import polars as pl

        return {"line": pl.Int64, "reason": pl.String, "raw": pl.String}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- single rows -------------------------------------------------------------------------

def row_id(messages: list[dict]) -> str:
    """Stable content hash of a conversation: equal role/content sequences give equal ids."""
    return hash_obj([{"role": m["role"], "content": m["content"]} for m in messages])


def text_of(messages) -> str:
    """All message contents joined by newlines (what dedup compares)."""
    if not messages:
        return ""
    return "\n".join(m["content"] for m in messages if m.get("content") is not None)


def text_column(table, column: str | None, what: str) -> str:
    """The column holding a table's text: `column` when given, else `messages`, else `text`.
    `what` names the input in the error, e.g. "dedup input 'pool'"."""
    chosen = column or ("messages" if "messages" in table.columns else "text")
    if chosen not in table.columns:
        from datamill.errors import DatamillError

        hint = "" if column else " (no `messages` or `text` column)"
        raise DatamillError(f"{what} has no column '{chosen}'{hint}; available columns: "
                            f"{', '.join(table.columns)}; set `column:` to the one holding the text")
    return chosen


def is_messages_column(table, column: str) -> bool:
    import polars as pl

    dtype = table.schema[column]
    return isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)


def column_texts(table, column: str) -> list[str]:
    """One text per row: messages joined by `text_of`, lists joined by newlines, else str()."""
    import polars as pl

    values = table[column].to_list()
    if is_messages_column(table, column):
        return [text_of(v) for v in values]
    if isinstance(table.schema[column], pl.List):
        return ["\n".join(str(x) for x in v if x is not None) if v else "" for v in values]
    return ["" if v is None else str(v) for v in values]


def normalize_record(row: dict, source: str) -> dict:
    """One input row in any accepted shape -> a canonical row; raises RecordError(reason)."""
    if not isinstance(row, dict):
        raise RecordError(f"row is a {json_type(row)}, expected an object")
    messages, consumed = _messages_from(row)
    _validate(messages)
    record = {"id": row_id(messages), "messages": messages, "source": source}
    record.update(_provenance(row))
    for key, value in row.items():
        if key not in consumed and key not in record:
            record[key] = value
    return record


def accepted_rows_note() -> str:
    """One line telling a user which row layouts a `schema: instruction` source accepts."""
    layouts = ", ".join(layout for _, layout in ACCEPTED_SHAPES)
    return f"accepted rows: {layouts}; or set `schema: raw` to keep columns as they are"


def _messages_from(row: dict) -> tuple[list[dict], set[str]]:
    """The conversation in `row` as [{role, content}], and the input keys it was built from."""
    if row.get("messages") is not None:
        return _from_messages(_maybe_json(row["messages"], "messages")), {"messages"}
    if row.get("prompt") is not None and row.get("response") is not None:
        messages = []
        if _optional_text(row, "system"):
            messages.append({"role": "system", "content": _text(row, "system")})
        messages.append({"role": "user", "content": _text(row, "prompt")})
        messages.append({"role": "assistant", "content": _text(row, "response")})
        return messages, {"prompt", "response", "system"}
    if row.get("instruction") is not None and row.get("output") is not None:
        user = _text(row, "instruction")
        extra_input = _optional_text(row, "input")
        if extra_input:
            user = f"{user}\n\n{extra_input}"
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _text(row, "output")}]
        return messages, {"instruction", "input", "output"}
    if row.get("conversations") is not None:
        return _from_sharegpt(_maybe_json(row["conversations"], "conversations")), {"conversations"}
    present = ", ".join(sorted(str(k) for k in row)) or "no fields"
    raise RecordError(f"missing field: expected one of {EXPECTED_SHAPES} (row has: {present})")


def _from_messages(items) -> list[dict]:
    return _turns(items, "messages", "role", "content", {r: r for r in ROLES})


def _from_sharegpt(items) -> list[dict]:
    return _turns(items, "conversations", "from", "value", SHARE_GPT_ROLES)


def _turns(items, field: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    """Turns as {role, content}, from a list of objects keyed `role_key`/`content_key`."""
    if not isinstance(items, list):
        raise RecordError(f"{field} must be a list of {{{role_key}, {content_key}}} objects, got a {json_type(items)}")
    messages = []
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise RecordError(f"message {number} must be an object with {role_key} and {content_key}, "
                              f"got a {json_type(item)}")
        speaker = item.get(role_key)
        if speaker is None:
            raise RecordError(f"message {number} has no {role_key!r}")
        if speaker not in roles:
            raise RecordError(f"unknown role {speaker!r} in message {number} (expected one of "
                              f"{', '.join(dict.fromkeys(roles))})")
        role = roles[speaker]
        messages.append({"role": role, "content": _content(item.get(content_key), number, role)})
    return messages


def _content(value, number: int, role: str) -> str:
    if value is None:
        raise RecordError(f"empty content in message {number} ({role})")
    if not isinstance(value, str):
        raise RecordError(f"content of message {number} ({role}) must be a string, got a {json_type(value)}")
    return value


def _validate(messages: list[dict]) -> None:
    for number, message in enumerate(messages, 1):
        if not message["content"].strip():
            raise RecordError(f"empty content in message {number} ({message['role']})")
    roles = {m["role"] for m in messages}
    if "user" not in roles or "assistant" not in roles:
        raise RecordError("messages must contain a user and an assistant turn")


def _text(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise RecordError(f"field '{key}' must be a string, got a {json_type(value)}")
    return value


def _optional_text(row: dict, key: str) -> str:
    """An optional text field; absent, null and blank all mean 'not given'."""
    if row.get(key) is None:
        return ""
    value = _text(row, key)
    return value if value.strip() else ""


def _maybe_json(value, key: str):
    """CSV cells can only hold text: accept a conversation given as a JSON string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise RecordError(f"field '{key}' is text that is not valid JSON: {err.msg}") from None
    return value


def _provenance(row: dict) -> dict:
    out = {}
    for key in ("gen_prompt", "gen_model", "parent_id"):
        value = row.get(key)
        out[key] = None if value is None else str(value)
    out["gen_seed"] = _seed(row.get("gen_seed"))
    return out


def _seed(value) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise RecordError(f"gen_seed must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise RecordError(f"gen_seed must be an integer, got {value!r}")


def json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --- frames ------------------------------------------------------------------------------

def raw_text(row, limit: int = MAX_RAW_CHARS) -> str:
    """A row as JSON text for the `raw` column of a rejected table (truncated)."""
    if isinstance(row, (bytes, bytearray)):
        # Decode only what can show, so a 1 GB line doesn't get decoded just to be cut.
        return bytes(row[: limit * 4]).decode("utf-8", errors="replace")[:limit]
    if isinstance(row, str):
        return row[:limit]
    return json.dumps(row, ensure_ascii=False, default=str)[:limit]


def row_bytes(row) -> int:
    """Size of a row as UTF-8 JSON: how `max_row_bytes` is measured for non-JSONL inputs."""
    return len(json.dumps(row, ensure_ascii=False, default=str).encode("utf-8"))


def oversized_reason(size: int, max_row_bytes: int) -> str:
    return f"row too large: {size:,} bytes, over max_row_bytes={max_row_bytes:,}"


def rejected_frame(rejected: list[dict]):
    """Rejected rows ({line, reason, raw}) as a DataFrame, sorted by line; empty has the columns too."""
    import polars as pl

    frame = pl.DataFrame(rejected, schema=__getattr__("REJECTED_SCHEMA"), orient="row"
                         ) if rejected else pl.DataFrame(schema=__getattr__("REJECTED_SCHEMA"))
    return frame.sort("line", maintain_order=True)


def records_frame(records: list[dict]):
    """Canonical records as a DataFrame: canonical columns typed and first, extras inferred after."""
    import polars as pl

    schema = __getattr__("INSTRUCTION_SCHEMA")
    if not records:
        return pl.DataFrame(schema=schema)
    frame = pl.DataFrame(records, schema_overrides=schema, infer_schema_length=None, strict=False)
    extras = [c for c in frame.columns if c not in schema]
    return frame.select([*schema, *extras])


def concat_frames(frames: list):
    """Concatenate chunks whose extra columns may differ (missing -> null, types widened)."""
    import polars as pl

    if len(frames) == 1:
        return frames[0]
    return pl.concat(frames, how="diagonal_relaxed")


def normalize_frame(rows: Iterable[tuple[int, dict]], source: str, max_row_bytes: int | None = None):
    """Normalise (line number, row) pairs -> (ok, rejected) Polars DataFrames.

    `ok` has the canonical schema plus extra columns; `rejected` has `line` (the 1-based line or
    row number given), `reason` and `raw` (the row as JSON, truncated to 2,000 characters).
    `max_row_bytes` rejects rows whose JSON text is larger (None: the caller checked already).
    """
    frames, chunk, rejected = [], [], []
    for line, row in rows:
        try:
            if max_row_bytes is not None:
                size = row_bytes(row)
                if size > max_row_bytes:
                    raise RecordError(oversized_reason(size, max_row_bytes))
            chunk.append(normalize_record(row, source))
        except RecordError as err:
            rejected.append({"line": line, "reason": err.reason, "raw": raw_text(row)})
        if len(chunk) >= _CHUNK_ROWS:
            frames.append(records_frame(chunk))
            chunk = []
    if chunk or not frames:
        frames.append(records_frame(chunk))
    return concat_frames(frames), rejected_frame(rejected)
