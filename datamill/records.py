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

`normalize_record` normalises one row (a dict); `normalize_columns` does the same on the columns
of a DataFrame for the rows whose result it is certain of, leaving the others to it.

Preference rows (DPO and the like) have their own canonical form, `PREFERENCE_SCHEMA`:

    id          str   stable content hash of prompt + chosen + rejected (`preference_id`)
    prompt      list<struct<role, content>>   the shared conversation before the compared turn:
                      usually one user message, maybe a system message and earlier turns
    chosen      list<struct<role, content>>   the preferred completion, normally one assistant message
    rejected    list<struct<role, content>>   the other completion, in the same form
    source      str
    gen_prompt, gen_model, gen_seed, parent_id    provenance, as in the instruction schema

followed by any extra input columns as they were (`score_chosen`, `prompt_id`, ...).
`normalize_preference_record` accepts the layouts of `ACCEPTED_PREFERENCE_SHAPES` (TRL's
conversational, standard and implicit-prompt forms, the last as HuggingFaceH4/ultrafeedback_binarized
stores it; lists may come as JSON text, as CSV cells hold them). Preference rows take the row path
only (no columnar fast path): preference datasets are small next to instruction pools.

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

# The preference layouts `normalize_preference_record` accepts: (short name, layout).
ACCEPTED_PREFERENCE_SHAPES = (
    ("conversational", "{prompt: [{role, content}, ...], chosen: [assistant turns], rejected: [assistant turns]}"
                       " (TRL conversational)"),
    ("standard", "{prompt: text, chosen: text, rejected: text} (+ system; TRL standard)"),
    ("implicit prompt", "{chosen: [whole conversation], rejected: [whole conversation]} (+ prompt: the first "
                        "user turn's text, as ultrafeedback_binarized has it): the turns both start with "
                        "are the prompt"),
    ("JSON text", "any of those lists given as JSON text (CSV cells)"),
)
PREFERENCE_COLUMNS = ("id", "prompt", "chosen", "rejected", "source") + PROVENANCE_COLUMNS
# Text that may hold a JSON list of turns (a CSV cell); other text is a prompt or completion as it is
_JSON_TURNS_START = ("[{", "[ {", "[\n", "[\r\n")

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
    if name == "PREFERENCE_SCHEMA":
        import polars as pl

        messages = __getattr__("MESSAGES_DTYPE")
        return {"id": pl.String, "prompt": messages, "chosen": messages, "rejected": messages,
                "source": pl.String, **__getattr__("PROVENANCE")}
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


# --- preference rows ---------------------------------------------------------------------

def preference_id(prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> str:
    """Stable content hash of a preference pair: equal prompt/chosen/rejected turns give equal ids."""
    def turns(messages):
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    return hash_obj({"prompt": turns(prompt), "chosen": turns(chosen), "rejected": turns(rejected)})


def normalize_preference_record(row: dict, source: str) -> dict:
    """One input row in an accepted preference layout -> a canonical preference row; raises
    RecordError(reason).

    chosen/rejected are each either a completion (text, or turns starting with an assistant
    turn) or a whole conversation (turns starting with a system or user turn). Completions need a
    `prompt` (text: one user turn, after an optional `system` text; or turns). Whole conversations
    carry their prompt: the turns both start with (TRL's implicit prompt); a `prompt` given as
    well must agree with them (text: the first user turn's content, as ultrafeedback_binarized
    stores it, and is then consumed; turns: a prefix of both, which is then the prompt).
    """
    if not isinstance(row, dict):
        raise RecordError(f"row is a {json_type(row)}, expected an object")
    missing = [key for key in ("chosen", "rejected") if row.get(key) is None]
    if missing:
        present = ", ".join(sorted(str(k) for k in row)) or "no fields"
        layouts = " | ".join(name for name, _ in ACCEPTED_PREFERENCE_SHAPES)
        raise RecordError(f"missing field {' and '.join(repr(k) for k in missing)}: a preference row needs "
                          f"chosen and rejected ({layouts}; row has: {present})")
    chosen, chosen_whole = _side(row["chosen"], "chosen")
    rejected, rejected_whole = _side(row["rejected"], "rejected")
    if chosen_whole != rejected_whole:
        whole, part = ("chosen", "rejected") if chosen_whole else ("rejected", "chosen")
        raise RecordError(f"{whole} is a whole conversation (it starts with a user or system turn) but {part} "
                          f"is a completion (text or assistant turns): give both in the same form")
    consumed = {"prompt", "chosen", "rejected"}
    prompt, prompt_is_text = _preference_prompt(row)
    if chosen_whole:
        prompt, chosen, rejected = _split_conversations(chosen, rejected, prompt, prompt_is_text)
    elif prompt is None:
        raise RecordError("missing field 'prompt': chosen and rejected are completions (text or assistant "
                          "turns), so the prompt they answer must be given; or give both as whole conversations")
    elif prompt_is_text and _optional_text(row, "system"):
        prompt = [{"role": "system", "content": _text(row, "system")}, *prompt]
        consumed.add("system")
    _validate_prompt(prompt)
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        _validate_completion(turns, name)
    if chosen == rejected:
        raise RecordError(IDENTICAL_REASON)
    record = {"id": preference_id(prompt, chosen, rejected), "prompt": prompt, "chosen": chosen,
              "rejected": rejected, "source": source}
    record.update(_provenance(row))
    for key, value in row.items():
        if key not in consumed and key not in record:
            record[key] = value
    return record


IDENTICAL_REASON = "chosen and rejected are identical (same turns, same text): a pair needs two different completions"


def accepted_preference_rows_note() -> str:
    """One line telling a user which row layouts a `schema: preference` source accepts."""
    layouts = "; ".join(layout for _, layout in ACCEPTED_PREFERENCE_SHAPES)
    return f"accepted preference rows: {layouts}; or set `schema: raw` to keep columns as they are"


def _json_turns(value):
    """Text holding a JSON list of objects -> that list; other text stays text (a prompt or an
    answer may well start with a bracket)."""
    if isinstance(value, str) and value.lstrip().startswith(_JSON_TURNS_START):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, list) and decoded and all(isinstance(item, dict) for item in decoded):
            return decoded
    return value


def _field_turns(items: list, field: str) -> list[dict]:
    """A list of {role, content} (or ShareGPT {from, value}) objects as turns; reasons name `field`."""
    sharegpt = bool(items) and isinstance(items[0], dict) and "from" in items[0] and "role" not in items[0]
    try:
        return _from_sharegpt(items) if sharegpt else _from_messages(items)
    except RecordError as err:
        raise RecordError(f"{field}: {err.reason}") from None


def _side(value, field: str) -> tuple[list[dict], bool]:
    """chosen or rejected as (turns, whether it is a whole conversation rather than a completion)."""
    value = _json_turns(value)
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}], False
    if not isinstance(value, list):
        raise RecordError(f"field '{field}' must be text or a list of {{role, content}} turns, got a "
                          f"{json_type(value)}")
    turns = _field_turns(value, field)
    return turns, bool(turns) and turns[0]["role"] != "assistant"


def _preference_prompt(row: dict) -> tuple[list[dict] | None, bool]:
    """(the `prompt` field as turns, or None when absent; whether it was plain text)."""
    value = _json_turns(row.get("prompt"))
    if value is None:
        return None, False
    if isinstance(value, str):
        return [{"role": "user", "content": value}], True
    if not isinstance(value, list):
        raise RecordError(f"field 'prompt' must be text or a list of {{role, content}} turns, got a "
                          f"{json_type(value)}")
    return _field_turns(value, "prompt"), False


def _split_conversations(chosen: list[dict], rejected: list[dict], prompt: list[dict] | None,
                         prompt_is_text: bool):
    """Two whole conversations -> (prompt, chosen, rejected): the prompt is the turns both start
    with, or the `prompt` turns given when both start with them."""
    if prompt is not None and not prompt_is_text:
        if chosen[:len(prompt)] != prompt or rejected[:len(prompt)] != prompt:
            raise RecordError("chosen and rejected are whole conversations that do not start with the "
                              "turns of field 'prompt'")
        return prompt, chosen[len(prompt):], rejected[len(prompt):]
    if chosen == rejected:
        raise RecordError(IDENTICAL_REASON)
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    if common == 0:
        raise RecordError("chosen and rejected are whole conversations that do not start with the same "
                          "turn: there is no shared prompt")
    shared = chosen[:common]
    if prompt is not None:
        first_user = next((m["content"] for m in shared if m["role"] == "user"), None)
        if first_user != prompt[0]["content"]:
            raise RecordError("field 'prompt' differs from the first user turn of the conversation chosen "
                              "and rejected start with")
    return shared, chosen[common:], rejected[common:]


def _validate_prompt(prompt: list[dict]) -> None:
    for number, message in enumerate(prompt, 1):
        if not message["content"].strip():
            raise RecordError(f"prompt: empty content in message {number} ({message['role']})")
    if not any(m["role"] == "user" for m in prompt):
        raise RecordError("prompt has no user turn")


def _validate_completion(turns: list[dict], field: str) -> None:
    if not turns:
        raise RecordError(f"empty completion: {field} has no turns after the prompt")
    for number, message in enumerate(turns, 1):
        if not message["content"].strip():
            raise RecordError(f"empty completion: {field} message {number} ({message['role']}) has no text")
    if turns[-1]["role"] != "assistant":
        raise RecordError(f"{field} must end with an assistant turn (its last turn is a {turns[-1]['role']} turn)")


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


def records_frame(records: list[dict], schema_name: str = "INSTRUCTION_SCHEMA"):
    """Canonical records as a DataFrame: canonical columns typed and first, extras inferred after.
    `schema_name`: "PREFERENCE_SCHEMA" for preference records."""
    import polars as pl

    schema = __getattr__(schema_name)
    if not records:
        return pl.DataFrame(schema=schema)
    frame = pl.DataFrame(records, schema_overrides=schema, infer_schema_length=None, strict=False)
    extras = [c for c in frame.columns if c not in schema]
    return frame.select([*schema, *extras])


def preference_frame(records: list[dict]):
    """Canonical preference records as a DataFrame (see `records_frame`)."""
    return records_frame(records, "PREFERENCE_SCHEMA")


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
    return _normalize_rows(rows, source, max_row_bytes, normalize_record, records_frame)


def normalize_preference_frame(rows: Iterable[tuple[int, dict]], source: str, max_row_bytes: int | None = None):
    """`normalize_frame` for preference rows: (ok, rejected), `ok` in the preference schema."""
    return _normalize_rows(rows, source, max_row_bytes, normalize_preference_record, preference_frame)


def _normalize_rows(rows, source: str, max_row_bytes: int | None, normalize, make_frame):
    frames, chunk, rejected = [], [], []
    for line, row in rows:
        try:
            if max_row_bytes is not None:
                size = row_bytes(row)
                if size > max_row_bytes:
                    raise RecordError(oversized_reason(size, max_row_bytes))
            chunk.append(normalize(row, source))
        except RecordError as err:
            rejected.append({"line": line, "reason": err.reason, "raw": raw_text(row)})
        if len(chunk) >= _CHUNK_ROWS:
            frames.append(make_frame(chunk))
            chunk = []
    if chunk or not frames:
        frames.append(make_frame(chunk))
    return concat_frames(frames), rejected_frame(rejected)


# --- whole columns -------------------------------------------------------------------------
# `normalize_record` one dict at a time is most of the time a large source takes. The functions
# below do the same work on whole columns with Polars, but only for the rows whose result they
# can be certain of from the column types and values (the most common row layout of a batch,
# text columns holding text, ...). Every other row is left to `normalize_record`, so the reasons
# and the edge cases stay exactly those of the row path, and the two paths give equal tables.

# What `str.strip()` removes (the characters of `str.isspace()`): what makes a message "empty".
PY_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
                 "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_BLANK = "^[" + "".join(f"\\x{{{ord(c):x}}}" for c in PY_WHITESPACE) + "]*$"
# The input columns each layout consumes (`_messages_from`); the others become extra columns.
SHAPE_COLUMNS = {"messages": ("messages",), "prompt+response": ("prompt", "response", "system"),
                 "instruction+output": ("instruction", "input", "output"), "conversations": ("conversations",)}
_SEED_TEXT = r"^-?[0-9]{1,18}$"  # a gen_seed string that int() reads and Int64 holds, without doubt


def normalize_columns(frame, source: str):
    """`normalize_record` on the rows of a DataFrame whose result is certain from their columns.

    -> (ok, fast): `fast` is a boolean Series with one value per row of `frame`; `ok` holds the
    canonical records of the `fast` rows, in order, followed by the extra columns as `frame` has
    them (the caller gives them the types `records_frame` would). The other rows go through
    `normalize_record` (they may be rejected, or need Python to be read as the row path reads them).
    """
    import polars as pl

    shape, candidate = _common_shape(frame)
    found = None if shape is None else _SHAPE_TURNS[shape](frame, candidate)
    if found is None:
        return _empty_ok(), pl.Series("fast", [False] * frame.height, dtype=pl.Boolean)
    turns, certain, canonical = found
    provenance, provenance_certain = _provenance_columns(frame)
    per_row = (turns.group_by("row")
               .agg(pl.col("good").all() & (pl.col("role") == "user").any() & (pl.col("role") == "assistant").any()))
    good = pl.Series("fast", [False] * frame.height, dtype=pl.Boolean).scatter(per_row["row"], per_row["good"])
    fast = (certain & frame.select(provenance_certain).to_series() & good).fill_null(False)
    if not fast.any():
        return _empty_ok(), fast.alias("fast")

    turns = turns.filter(fast.gather(turns["row"]))
    rows = turns.group_by("row", maintain_order=True).agg(pl.struct("role", "content").alias("messages"))
    # The ids: sha256 of the canonical JSON of each row's [{content, role}, ...], as `row_id`.
    if canonical is None:  # a list of turns: join the JSON of its turns
        each = turns.select("row", _turn_json(pl.col("content"), pl.col("role")))
        canonical = "[" + each.group_by("row", maintain_order=True).agg("json")["json"].list.join(",") + "]"
    else:
        canonical = frame.filter(fast).select(canonical).to_series()
    consumed = set(SHAPE_COLUMNS[shape]) | set(CANONICAL_COLUMNS)
    ok = frame.filter(fast).select(
        pl.Series("id", _hash_texts(canonical), dtype=pl.String),
        rows["messages"].cast(__getattr__("MESSAGES_DTYPE")),
        pl.lit(source, dtype=pl.String).alias("source"),
        *provenance, *[c for c in frame.columns if c not in consumed])
    return ok, fast.alias("fast")


def _empty_ok():
    import polars as pl

    return pl.DataFrame(schema=__getattr__("INSTRUCTION_SCHEMA"))


def _turn_json(content, role):
    """`canonical_json` of {"role": role, "content": content}: Polars' JSON encoder escapes
    exactly the characters json.dumps escapes, and the keys come sorted."""
    import polars as pl

    return pl.struct(content=content, role=role).struct.json_encode().alias("json")


def _hash_texts(canonical) -> list[str]:
    """`hash_obj` of each conversation from its canonical JSON: sha256 a row at a time in Python,
    on the UTF-8 bytes Polars holds (measured: ~4 µs a row on a loaded 2-core machine, half of
    that with a str per row; DuckDB's sha256 was 2x slower)."""
    import hashlib

    import polars as pl

    sha256 = hashlib.sha256
    return [sha256(text).hexdigest()[:16] for text in canonical.cast(pl.Binary).to_list()]


def _present(frame, column: str):
    """`row.get(column) is not None`, for every row."""
    import polars as pl

    return pl.col(column).is_not_null() if column in frame.columns else pl.lit(False)


def _common_shape(frame):
    """(the layout most rows of `frame` have, the rows that have it as a boolean Series); the
    first layout that matches a row is its layout, as in `_messages_from`. Only one layout is
    taken: with several, which columns are extra (and in what order) would differ from row to
    row; the rows of the other layouts go through the row path."""
    import polars as pl

    shape = pl.when(_present(frame, "messages")).then(pl.lit("messages"))
    shape = shape.when(_present(frame, "prompt") & _present(frame, "response")).then(pl.lit("prompt+response"))
    shape = shape.when(_present(frame, "instruction") & _present(frame, "output")).then(pl.lit("instruction+output"))
    shape = shape.when(_present(frame, "conversations")).then(pl.lit("conversations"))
    shapes = frame.select(shape.alias("shape")).to_series()
    counts = {name: n for name, n in shapes.value_counts().iter_rows() if name is not None}
    if not counts:
        return None, None
    common = max(SHAPE_COLUMNS, key=lambda name: counts.get(name, 0))
    return common, (shapes == common).fill_null(False)


def _blank(expr):
    """`not text.strip()`, with Python's whitespace."""
    return expr.str.contains(_BLANK)


def _optional_text_column(frame, name: str, certain):
    """An optional column that must hold text (system, input): (expression, rows certain);
    a row where it holds another type goes to the row path."""
    import polars as pl

    dtype = frame.schema.get(name, pl.Null)
    if dtype == pl.String:
        return pl.col(name), certain
    if dtype != pl.Null:
        certain = certain & frame.select(pl.col(name).is_null()).to_series()
    return pl.lit(None, dtype=pl.String), certain


def _turns_frame(frame, parts, certain):
    """Turns (row, role, content, good) of the `certain` rows, from [(role, content, included)]
    expressions, in row order then `parts` order; and the expression of each row's canonical
    JSON (what `row_id` hashes), made from the columns at once rather than from the turns."""
    import polars as pl

    turns_json = [pl.when(included).then(_turn_json(content, pl.lit(role))) for role, content, included in parts]
    canonical = pl.concat_str([pl.lit("["), pl.concat_str(turns_json, separator=",", ignore_nulls=True),
                               pl.lit("]")])

    rows = frame.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("row"),
                        *[content.alias(f"content{k}") for k, (_, content, _) in enumerate(parts)],
                        *[included.alias(f"included{k}") for k, (_, _, included) in enumerate(parts)]
                        ).filter(certain)
    long = pl.concat([rows.filter(f"included{k}").select("row", pl.lit(k, dtype=pl.UInt8).alias("k"),
                                                          pl.lit(role).alias("role"),
                                                          pl.col(f"content{k}").alias("content"))
                      for k, (role, _, _) in enumerate(parts)])
    long = long.sort("row", "k").select("row", "role", "content", good=~_blank(pl.col("content")))
    return long, canonical


def _prompt_turns(frame, candidate):
    import polars as pl

    if frame.schema["prompt"] != pl.String or frame.schema["response"] != pl.String:
        return None
    system, certain = _optional_text_column(frame, "system", candidate)
    parts = [("system", system, system.is_not_null() & ~_blank(system)),
             ("user", pl.col("prompt"), pl.lit(True)), ("assistant", pl.col("response"), pl.lit(True))]
    turns, canonical = _turns_frame(frame, parts, certain)
    return turns, certain, canonical


def _instruction_turns(frame, candidate):
    import polars as pl

    if frame.schema["instruction"] != pl.String or frame.schema["output"] != pl.String:
        return None
    extra, certain = _optional_text_column(frame, "input", candidate)
    user = (pl.when(extra.is_not_null() & ~_blank(extra))
            .then(pl.concat_str([pl.col("instruction"), pl.lit("\n\n"), extra])).otherwise(pl.col("instruction")))
    parts = [("user", user, pl.lit(True)), ("assistant", pl.col("output"), pl.lit(True))]
    turns, canonical = _turns_frame(frame, parts, certain)
    return turns, certain, canonical


def _list_turns(frame, candidate, column: str, role_key: str, content_key: str, roles: dict[str, str]):
    """Turns of a column of lists of {role_key, content_key} objects holding text."""
    import polars as pl

    dtype = frame.schema[column]
    if isinstance(dtype, pl.Array):
        dtype = pl.List(dtype.inner)
    if not isinstance(dtype, pl.List) or not isinstance(dtype.inner, pl.Struct):
        return None  # JSON text (from a CSV) or another type: the row path reads it, or rejects it
    fields = {f.name: f.dtype for f in dtype.inner.fields}
    if fields.get(role_key) != pl.String or fields.get(content_key) != pl.String:
        return None
    items = pl.col(column).cast(dtype)
    # A good row has a user and an assistant turn: a list of fewer than 2 items is rejected.
    certain = candidate & frame.select(items.list.len() >= 2).to_series().fill_null(False)
    long = (frame.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("row"), items.alias("item"))
            .filter(certain).explode("item"))
    speaker = pl.col("item").struct.field(role_key)
    content = pl.col("item").struct.field(content_key)
    long = long.select(
        "row", speaker.replace_strict(roles, default=None, return_dtype=pl.String).alias("role"),
        content.alias("content"),
        good=(pl.col("item").is_not_null() & speaker.is_in(list(roles)) & ~_blank(content)).fill_null(False))
    return long, certain, None  # the canonical JSON is joined from the turns


def _messages_turns(frame, candidate):
    return _list_turns(frame, candidate, "messages", "role", "content", {r: r for r in ROLES})


def _conversation_turns(frame, candidate):
    return _list_turns(frame, candidate, "conversations", "from", "value", SHARE_GPT_ROLES)


_SHAPE_TURNS = {"messages": _messages_turns, "prompt+response": _prompt_turns,
                "instruction+output": _instruction_turns, "conversations": _conversation_turns}

_INTEGERS = ("Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32")


def _provenance_columns(frame):
    """(the provenance columns as `_provenance` makes them, rows for which that is certain)."""
    import polars as pl

    certain = pl.repeat(True, pl.len())  # a column, not a scalar: the caller selects it as a mask
    columns = []
    for key in ("gen_prompt", "gen_model", "parent_id"):
        dtype = frame.schema.get(key, pl.Null)
        if dtype == pl.Null:
            value = pl.lit(None, dtype=pl.String)
        elif dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum) or str(dtype) in _INTEGERS:
            value = pl.col(key).cast(pl.String)  # str() of text or of an integer: the same text
        else:  # str() of a float, bool or list is Python's own spelling: the row path writes it
            value = pl.lit(None, dtype=pl.String)
            certain = certain & pl.col(key).is_null()
        columns.append(value.alias(key))
    seed, seed_certain = _seed_column(frame)
    columns.insert(2, seed.alias("gen_seed"))  # the canonical order: gen_prompt, gen_model, gen_seed, parent_id
    return columns, certain & seed_certain


def _seed_column(frame):
    """`_seed` on the gen_seed column: (Int64 expression, rows certain)."""
    import polars as pl

    dtype = frame.schema.get("gen_seed", pl.Null)
    column = pl.col("gen_seed")
    if dtype == pl.Null:
        return pl.lit(None, dtype=pl.Int64), pl.lit(True)
    if str(dtype) in _INTEGERS:
        return column.cast(pl.Int64), pl.lit(True)
    if dtype in (pl.Float32, pl.Float64):
        # an integral float is that integer; far from 2**63 the conversion is exact
        whole = column.is_finite() & (column == column.round()) & (column.abs() < 2.0**53)
        return pl.when(whole).then(column.cast(pl.Int64, strict=False)), column.is_null() | whole
    if dtype == pl.String:
        digits = column.str.contains(_SEED_TEXT)
        value = pl.when(digits).then(column.cast(pl.Int64, strict=False))
        return value, column.is_null() | _blank(column) | digits
    return pl.lit(None, dtype=pl.Int64), column.is_null()


def python_types(frame):
    """`frame` with the types that `records_frame` gives its values after `iter_rows` (a table
    read from Parquet or a datasets folder goes through Python dicts in the row path): small
    integers become Int64, Float32 Float64, categories text, a column of nulls Null; other types
    (dates, decimals, nested values, ...) make the same round trip through Python, column by column."""
    import polars as pl

    columns = []
    for name, dtype in frame.schema.items():
        column = frame[name]
        if column.null_count() == column.len():
            columns.append(column.cast(pl.Null))
        elif dtype in (pl.String, pl.Boolean, pl.Int64, pl.Float64):
            columns.append(column)
        elif str(dtype) in _INTEGERS:
            columns.append(column.cast(pl.Int64))
        elif dtype == pl.Float32:
            columns.append(column.cast(pl.Float64))
        elif dtype == pl.Categorical or isinstance(dtype, pl.Enum):
            columns.append(column.cast(pl.String))
        else:
            values = column.to_list()
            columns.append(pl.DataFrame([{name: v} for v in values], infer_schema_length=None, strict=False)[name])
    return pl.DataFrame(columns) if columns else frame
