"""`source`: read a local file/folder or a Hugging Face hub dataset into a table.

With `schema: instruction` (the default) every row is normalised to the canonical
instruction schema (see `datamill/records.py`); with `schema: preference` to the canonical
preference schema (prompt/chosen/rejected message lists, `records.normalize_preference_record`);
with `schema: raw` columns are kept as they are. Either way a row that cannot be read (invalid
UTF-8, bad JSON, not an object, over `max_row_bytes`, a CSV record with the wrong number of
fields or an unterminated quote) or normalised goes to `<name>__rejected` with its line number
and the reason: nothing is dropped silently. A source that ends with no row at all (an empty
file, or every row rejected) fails with the reasons unless `allow_empty: true`.

Rows are read in batches (32 MB of JSON Lines, 65,536 rows of a table or CSV file), parsed into
columns (pyarrow's JSON reader, which refuses what it cannot read as Python's json does) and
normalised by columns (`records.normalize_columns`); the rows that cannot be decided that way
with certainty, and every row of a batch the JSON reader refuses, take the row path (Python's
json, `records.normalize_record`), so that both tables are exactly what the row path makes of
the input. Each batch is written as it is done: memory holds a batch, not the input. JSON
arrays (.json) and `schema: raw` CSV files are read a row at a time. `schema: preference` rows
always take the row path, a batch of 65,536 rows at a time (preference sets are small next to
instruction pools, and their layouts are nested lists that a column reader would mostly hand back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Literal

from pydantic import ConfigDict, Field, model_validator

from datamill.errors import DatamillError, FieldError
from datamill.step import Env, Step, StepConfig

SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
                  ".pq": "parquet", ".csv": "csv"}
FORMAT_SUFFIXES = {"jsonl": {".jsonl", ".ndjson"}, "json": {".json"}, "parquet": {".parquet", ".pq"},
                   "csv": {".csv"}}
HUB_ONLY_FIELDS = ("hf_config", "revision", "token_env")
_PROGRESS_EVERY = 1000  # rows between progress updates: a redraw per row would cost more than the row
_BLOCK_BYTES = 32 << 20  # JSON Lines are read this much at a time (~50k rows of ~600 bytes)
_JSON_BLOCK_BYTES = 4 << 20  # ... and parsed by pyarrow in blocks of this size
_TABLE_ROWS = 65_536  # rows of a Parquet/datasets table or of a CSV file normalised at a time
# Read every row through the row path (`normalize_record` on one dict at a time) instead of by
# columns: the reference that tests/test_source_fast.py compares the column path with.
_ROW_PATH = False


class SourceConfig(StepConfig):
    """Where a table comes from: a local file or folder (`path`) or a hub dataset (`hf`)."""

    model_config = ConfigDict(serialize_by_alias=True)

    path: str | None = None
    """A file (.jsonl, .json, .parquet, .csv) or folder (data files of one format, or a folder
    saved with `datasets.Dataset.save_to_disk`), relative to the spec's folder."""
    hf: str | None = None
    """A Hugging Face hub dataset name, e.g. `tatsu-lab/alpaca` (needs network on first use)."""
    split: str = "train"
    """Split to read from a hub dataset or a saved DatasetDict."""
    hf_config: str | None = None
    """Hub dataset configuration (subset) name."""
    revision: str | None = None
    """Hub dataset revision (branch, tag or commit); pin it so the cache key follows the data."""
    token_env: str | None = None
    """Name of an environment variable holding a hub token (read at run time, never logged)."""
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "hf_disk"] = "auto"
    """File format; `auto` decides by suffix (a save_to_disk folder is `hf_disk`)."""
    record_schema: Literal["instruction", "preference", "raw"] = Field("instruction", alias="schema")
    """`instruction`: normalise rows to id/messages/source/provenance (+ extra columns);
    `preference`: normalise preference rows to id/prompt/chosen/rejected/source/provenance (+ extra
    columns), from TRL's conversational ({prompt, chosen, rejected} turn lists), standard (texts) or
    implicit-prompt (whole conversations, as ultrafeedback_binarized) layouts, lists also as JSON text;
    `raw`: keep columns as they are (bad lines and oversized rows are still rejected)."""
    max_row_bytes: int = Field(1_000_000, gt=0)
    """Rows larger than this (as JSON text) are rejected rather than loaded."""
    limit: int | None = Field(None, gt=0)
    """Read only the first N rows of the input (rejected rows count too); for quick trials."""
    allow_empty: bool = False
    """Let the source end with no rows. By default an input with no rows (an empty file, a CSV
    with only a header, a Parquet file of 0 rows) or whose every row is rejected fails the step
    with the main reasons, since that is almost always a wrong file or a wrong row layout."""

    @model_validator(mode="after")
    def _one_origin(self):
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of `path` (a local file or folder) or `hf` (a hub dataset)")
        if self.path is not None:
            given = [f for f in HUB_ONLY_FIELDS if getattr(self, f) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to hub sources (`hf:`), not to `path:`")
        elif self.format != "auto":
            raise ValueError("`format` applies to `path:` sources; hub datasets are read by `datasets`")
        return self


class SourceStep(Step):
    """Read rows from a file, folder or hub dataset; normalise them; reject the bad ones with a reason."""

    kind = "source"
    Config = SourceConfig
    side_tables = ("rejected",)

    # --- plan time: cheap checks, no heavy imports ---
    def resolved_path(self, env: Env) -> Path:
        return (Path(env.base_dir) / Path(self.config.path).expanduser()).resolve()

    def check(self, env: Env) -> None:
        if self.config.path is None:
            return
        path = self.resolved_path(env)
        if not path.exists():
            raise FieldError("path", f"file not found: {path}")
        data_files(path, self.config.format)  # raises FieldError when the format can't be told

    def key_material(self, env: Env) -> dict:
        if self.config.path is None:
            return {}  # the hub name and revision are in the config already
        from datamill.hashing import fingerprint_path

        path = self.resolved_path(env)
        if not path.exists():
            raise FieldError("path", f"file not found: {path}")
        return {"content": fingerprint_path(path)}

    # --- run time ---
    def run(self, ctx) -> None:
        from datamill.records import concat_frames

        budget = RowBudget(self.config.limit)
        rows_out, columns, written = 0, set(), False
        reasons = []  # (reason, file, line) of the rejected rows: the stats and messages name the main ones
        # Both tables are written batch by batch: memory holds a batch, not the input.
        with ctx.writer("rejected") as rejected_out, ctx.writer() as out:
            rejected_out.write(_empty_rejected())  # the side table exists even when nothing is rejected
            for label, reader in self._readers(ctx):
                if budget.exhausted:
                    break
                for ok, rejected in self._read_one(ctx, label, reader, budget):
                    if ok.width:  # `schema: raw` of a batch with no good row has no columns to write
                        out.write(ok)
                        written = True
                    rows_out += ok.height
                    columns.update(ok.columns)
                    rejected = rejected.with_columns(_literal("file", label))
                    rejected_out.write(rejected)
                    reasons.append(rejected.select("reason", "file", "line"))
            rejected = concat_frames(reasons) if reasons else _empty_rejected()
            if rows_out == 0 and not self.config.allow_empty:
                raise DatamillError(self._no_rows_message(ctx.name, rejected))
            if not columns and self.config.record_schema == "raw":
                # `schema: raw` with no good row of a JSON input has no columns to give the table, and
                # a Parquet file without columns is unreadable (DuckDB refuses it): fail with the reason.
                raise DatamillError(f"`schema: raw` found no good row in {self._origin()} to take the columns "
                                    f"from ({rejected.height} rejected); an empty table needs columns, which "
                                    "only a CSV header or a Parquet/datasets schema can give")
            if not written:  # a limit of rows reached before the first file, or an empty folder
                out.write(self._empty_ok())
        ctx.stats.update({"rows_in": rows_out + rejected.height, "rows_out": rows_out,
                          "rejected": rejected.height})
        if rejected.height:
            # Shown under the step's row counts (executor `_rows_note`) and kept as an MLflow tag.
            ctx.stats["warning"] = (f"{rejected.height} of {rows_out + rejected.height} rows rejected "
                                    f"(see {ctx.name}__rejected): " + "; ".join(_top_reasons(rejected)))

    def _origin(self) -> str:
        """The input as the user wrote it, for messages."""
        cfg = self.config
        return cfg.path if cfg.path is not None else f"hub dataset {cfg.hf} (split {cfg.split})"

    def _no_rows_message(self, name: str, rejected) -> str:
        if rejected.height == 0:
            return (f"read 0 rows from {self._origin()}; set `allow_empty: true` on source '{name}' "
                    "if that is expected")
        rows = f"all {rejected.height} rows" if rejected.height > 1 else "the only row"
        lines = [f"{rows} of {self._origin()} {'were' if rejected.height > 1 else 'was'} rejected; main reasons:"]
        lines += [f"  {reason}" for reason in _top_reasons(rejected)]
        if self.config.record_schema == "instruction":
            from datamill.records import accepted_rows_note

            lines.append(accepted_rows_note())
        elif self.config.record_schema == "preference":
            from datamill.records import accepted_preference_rows_note

            lines.append(accepted_preference_rows_note())
        lines.append(f"set `allow_empty: true` on source '{name}' to go on with no rows "
                     f"(the rejected rows then land in {name}__rejected)")
        return "\n".join(lines)

    def _readers(self, ctx) -> Iterator[tuple[str, "FileReader"]]:
        """(label for the `file` column of rejected rows, reader) for each input file/dataset."""
        cfg = self.config
        if cfg.hf is not None:
            yield f"hf:{cfg.hf}:{cfg.split}", TableReader(load_hub_table(cfg))
            return
        path = self.resolved_path(ctx.env)
        if not path.exists():
            raise DatamillError(f"file not found: {path}")
        for fmt, file in data_files(path, cfg.format):
            label = file.name if file == path else str(file.relative_to(path))
            if fmt == "hf_disk":
                yield label, TableReader(load_disk_table(file, cfg.split))
            else:
                yield label, make_file_reader(file, fmt)

    def _read_one(self, ctx, label: str, reader: "FileReader", budget: "RowBudget"):
        """(ok, rejected) frames, batch by batch, of one input file or dataset."""
        from datamill.progress import bar

        total = budget.cap(reader.count_rows())
        cfg = self.config
        with bar(f"{ctx.name}: {label}", total=total) as progress:
            job = Job(ctx.name, cfg.record_schema, cfg.max_row_bytes, budget, progress)
            if cfg.record_schema == "preference":
                yield from preference_batches(reader, job)
            else:
                yield from (row_path_batches(reader, job) if _ROW_PATH else reader.batches(job))

    def _empty_ok(self):
        import polars as pl

        from datamill.records import INSTRUCTION_SCHEMA, PREFERENCE_SCHEMA

        schemas = {"instruction": INSTRUCTION_SCHEMA, "preference": PREFERENCE_SCHEMA}
        return pl.DataFrame(schema=schemas.get(self.config.record_schema, {}))


# --- finding the files ---------------------------------------------------------------------

def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def data_files(path: Path, fmt: str) -> list[tuple[str, Path]]:
    """(format, file) for everything a path source reads, in a stable order; FieldError if unclear."""
    if fmt == "hf_disk" or (fmt == "auto" and is_saved_dataset(path)):
        if not is_saved_dataset(path):
            raise FieldError("format", f"{path} is not a folder saved with datasets' save_to_disk "
                                       "(no state.json or dataset_dict.json)")
        return [("hf_disk", path)]
    if path.is_file():
        if fmt != "auto":
            return [(fmt, path)]
        if path.suffix.lower() not in SUFFIX_FORMATS:
            raise FieldError("format", f"cannot tell the format of {path.name} from its suffix: "
                                       f"set format: jsonl | json | parquet | csv")
        return [(SUFFIX_FORMATS[path.suffix.lower()], path)]
    files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    wanted = FORMAT_SUFFIXES[fmt] if fmt != "auto" else set(SUFFIX_FORMATS)
    found = [f for f in files if f.suffix.lower() in wanted]
    if not found:
        raise FieldError("path", f"no data files ({', '.join(sorted(wanted))}) in folder {path}")
    formats = {SUFFIX_FORMATS[f.suffix.lower()] for f in found}
    if fmt == "auto" and len(formats) > 1:
        raise FieldError("format", f"folder {path} mixes formats ({', '.join(sorted(formats))}): "
                                   "set format: to the one to read")
    return [(fmt if fmt != "auto" else SUFFIX_FORMATS[f.suffix.lower()], f) for f in found]


# --- reading rows --------------------------------------------------------------------------
# A reader yields (line, row, problem): problem is None for a parsed row (a dict), else the
# reason it was rejected, with `row` holding the raw text or bytes for the rejected table.

class RowBudget:
    """How many more input rows `limit` allows, shared across the files of a folder."""

    def __init__(self, limit: int | None):
        self.left = limit

    @property
    def exhausted(self) -> bool:
        return self.left is not None and self.left <= 0

    def cap(self, total: int | None) -> int | None:
        if self.left is None:
            return total
        return self.left if total is None else min(total, self.left)

    def take(self) -> bool:
        if self.left is None:
            return True
        self.left -= 1
        return self.left >= 0

    def take_many(self, wanted: int) -> int:
        """How many of `wanted` more rows may be read (all of them without a limit)."""
        if self.left is None:
            return wanted
        allowed = min(wanted, max(self.left, 0))
        self.left -= allowed
        return allowed


def _item_batches(items, job: "Job", size: int):
    """A reader's items in lists of `size`, within the row budget, with progress."""
    batch = []
    for item in items:
        if not job.budget.take():
            break
        batch.append(item)
        if len(batch) == size:
            job.progress.advance(len(batch))
            yield batch
            batch = []
    job.progress.advance(len(batch))
    if batch:
        yield batch


def _good_rows(items, budget: RowBudget, progress, parse_rejects: list) -> Iterator[tuple[int, dict]]:
    """Pass parsed rows on, set aside the ones that failed to parse, count and show progress."""
    pending = 0
    for line, row, problem in items:
        if not budget.take():
            break
        pending += 1
        if pending == _PROGRESS_EVERY:
            progress.advance(pending)
            pending = 0
        if problem is None:
            yield line, row
        else:
            parse_rejects.append((line, problem, row))
    progress.advance(pending)


class Job:
    """What reading one input needs besides the reader: the step's name (the `source` column),
    the schema, the row size limit, the shared row budget and the progress bar."""

    def __init__(self, source: str, schema: str, max_row_bytes: int, budget: RowBudget, progress):
        self.source, self.schema, self.max_row_bytes = source, schema, max_row_bytes
        self.budget, self.progress = budget, progress


def row_path_batches(reader: "FileReader", job: Job):
    """One (ok, rejected) batch of a whole input, a row at a time: each row parsed into a dict
    and normalised by `normalize_record`."""
    from datamill.records import concat_frames, normalize_frame, raw_text, rejected_frame

    parse_rejects: list[tuple] = []  # (line, reason, raw input)
    rows = _good_rows(reader.items(job.max_row_bytes), job.budget, job.progress, parse_rejects)
    if job.schema == "raw":
        ok = reader.raw_frame(rows)
        normalize_rejects = rejected_frame([])
    else:
        # The size was checked on the raw input already, so max_row_bytes=None here.
        ok, normalize_rejects = normalize_frame(rows, job.source, max_row_bytes=None)
    parse_rejected = rejected_frame(
        [{"line": line, "reason": reason, "raw": raw_text(raw)} for line, reason, raw in parse_rejects])
    yield ok, concat_frames([parse_rejected, normalize_rejects]).sort("line", maintain_order=True)


def preference_batches(reader: "FileReader", job: Job):
    """(ok, rejected) of an input of preference rows, 65,536 rows at a time, each row through
    `normalize_preference_record`; rows that failed to parse are rejected with their reason as
    in the other schemas."""
    from datamill.records import normalize_preference_frame, raw_text, rejected_frame

    for batch in _item_batches(reader.items(job.max_row_bytes), job, _TABLE_ROWS):
        # The size was checked on the raw input already, so max_row_bytes=None here.
        ok, rejected = normalize_preference_frame(
            ((line, row) for line, row, problem in batch if problem is None), job.source)
        unread = rejected_frame([{"line": line, "reason": problem, "raw": raw_text(row)}
                                 for line, row, problem in batch if problem is not None])
        yield ok, _in_line_order(rejected, unread)


def _in_line_order(*frames):
    """Rejected frames as one, in line order."""
    from datamill.records import concat_frames

    return concat_frames([f for f in frames if f.height] or [frames[0]]).sort("line", maintain_order=True)


# --- reading by columns --------------------------------------------------------------------
# A batch of rows is parsed into a DataFrame and normalised column-wise (`normalize_columns`),
# and the rows it cannot be certain of take the row path, so that the tables are the ones the
# row path gives. An item is (line, row, problem) as the readers' `items` yield them.

def _row_path(items, source: str):
    """Items through `normalize_record`: ([(line, record)], [rejected {line, reason, raw}])."""
    from datamill.records import RecordError, normalize_record, raw_text

    records, rejects = [], []
    for line, row, problem in items:
        if problem is None:
            try:
                records.append((line, normalize_record(row, source)))
                continue
            except RecordError as err:
                problem = err.reason
        rejects.append({"line": line, "reason": problem, "raw": raw_text(row)})
    return records, rejects


def _rows_only(items):
    """`_row_path` for `schema: raw`: the rows as they are."""
    from datamill.records import raw_text

    rows = [(line, row) for line, row, problem in items if problem is None]
    rejects = [{"line": line, "reason": problem, "raw": raw_text(row)} for line, row, problem in items
               if problem is not None]
    return rows, rejects


def _merge(ok, ok_lines, rows, extras_from: int):
    """The rows normalised by columns (`ok`, at `ok_lines`) and by the row path (`rows`: (line,
    record)) in one frame, in line order; None when it could differ from the frame the row path
    makes of all of them (its types and column order come from the records in order), in which
    case the caller takes the row path for the whole batch. `extras_from`: where the columns that
    come from the input start (after the canonical ones; 0 for `schema: raw`)."""
    import numpy as np
    import polars as pl

    from datamill.records import records_frame

    if not rows:
        return ok
    slow = records_frame([r for _, r in rows]) if extras_from else frame_from_dicts([r for _, r in rows])
    if ok.height == 0:
        return slow
    # Same keys in the same order in every row-path record as in `ok`: then the first-seen column
    # order of all the rows is `ok`'s (a record with other keys could come first).
    extras = ok.columns[extras_from:]
    if any(list(record)[extras_from:] != extras for _, record in rows):
        return None
    for name, dtype in slow.schema.items():
        if dtype != ok.schema[name] and pl.Null not in (dtype, ok.schema[name]):
            return None  # a type the two infer apart (a column of ints and texts, ...)
    both = pl.concat([ok, slow], how="diagonal_relaxed")
    order = np.argsort(np.concatenate([np.asarray(ok_lines), [line for line, _ in rows]]), kind="stable")
    return both[order]


def _by_columns(job: Job, frame, lines, items_of, others, reparse=None, retype=None):
    """(ok, rejected) of a batch of rows.

    frame, lines: the rows parsed into columns, and their line numbers (numpy);
    items_of(indices): those rows (positions in `frame`) as the row path reads them: items;
    others: items the column reader did not take (lines it leaves to Python, rows it rejected);
    reparse(indices): the frame of just those rows, its types inferred from them alone, or None
      (a JSON reader infers types from the rows it reads; the row path from the rows it keeps);
    retype(frame): the input's columns with the types the row path gives them.
    """
    import numpy as np

    from datamill.records import CANONICAL_COLUMNS, normalize_columns, records_frame, rejected_frame

    def row_path():
        items = sorted([*items_of(np.arange(frame.height)), *others], key=lambda item: item[0])
        if job.schema == "raw":
            rows, rejects = _rows_only(items)
            return frame_from_dicts([row for _, row in rows]), rejected_frame(rejects)
        records, rejects = _row_path(items, job.source)
        return records_frame([record for _, record in records]), rejected_frame(rejects)

    if job.schema == "raw":
        rows, rejects = _rows_only(sorted(others, key=lambda item: item[0]))
        ok = _merge(frame if retype is None else retype(frame), lines, rows, 0)
        return (ok, rejected_frame(rejects)) if ok is not None else row_path()

    ok, fast = normalize_columns(frame, job.source)
    kept = np.flatnonzero(fast.to_numpy())
    if reparse is not None and 0 < len(kept) < frame.height:
        again = reparse(kept)
        if again is None:
            return row_path()
        ok, fast_again = normalize_columns(again, job.source)
        if not fast_again.all():
            return row_path()
    slow = np.flatnonzero(~fast.to_numpy())
    records, rejects = _row_path(sorted([*items_of(slow), *others], key=lambda item: item[0]), job.source)
    width = len(CANONICAL_COLUMNS)  # the input's own columns come after these
    if retype is not None and ok.height and ok.width > width:
        ok = ok[:, :width].hstack(retype(ok[:, width:]))
    ok = _merge(ok, lines[kept], records, width)
    return (ok, rejected_frame(rejects)) if ok is not None else row_path()


class FileReader:
    def count_rows(self) -> int | None:
        return None

    def items(self, max_row_bytes: int):
        raise NotImplementedError

    def batches(self, job: Job):
        """(ok, rejected) frames of the input, batch by batch; readers that can read by columns
        override this, the others read a row at a time."""
        return row_path_batches(self, job)

    def raw_frame(self, rows):
        """`schema: raw`: the good rows as a DataFrame with their own columns."""
        return frame_from_dicts([row for _, row in rows])


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _invalid_utf8(raw: bytes, err: UnicodeDecodeError) -> str:
    return f"invalid UTF-8: byte 0x{raw[err.start]:02x} at position {err.start}"


class JsonlReader(FileReader):
    """JSON Lines, read as bytes so that one bad line is one rejected row, not a failed step."""

    def __init__(self, path: Path):
        self.path = path

    def count_rows(self) -> int:
        return _count_lines(self.path)

    def items(self, max_row_bytes: int):
        with open(self.path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                if line_no == 1 and raw.startswith(_BOM):
                    raw = raw[3:]
                item = _jsonl_item(line_no, raw, max_row_bytes)
                if item is not None:
                    yield item

    def batches(self, job: "Job"):
        import numpy as np

        first = 1  # the number of a block's first line
        for data in _line_blocks(self.path):
            if first == 1 and data.startswith(_BOM):
                data = data[3:]  # not part of line 1, as in `items`
            ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
            if not data.endswith(b"\n"):
                ends = np.append(ends, len(data))
            yield _jsonl_batch(data, ends, first, job)
            first += len(ends)
            if job.budget.exhausted:
                return


_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark


def _jsonl_item(line_no: int, raw: bytes, max_row_bytes: int):
    """One line as the row path reads it: (line, row, problem), or None for a blank line."""
    import json

    raw = raw.rstrip(b"\r\n")
    if not raw.strip():
        return None  # blank lines hold no row
    if len(raw) > max_row_bytes:
        from datamill.records import oversized_reason

        return line_no, raw, oversized_reason(len(raw), max_row_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return line_no, raw, _invalid_utf8(raw, err)
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return line_no, text, f"invalid JSON: {err.msg} at column {err.colno}"
    if not isinstance(row, dict):
        return line_no, text, f"line is a JSON {_json_type(row)}, expected an object"
    return line_no, row, None


def _line_blocks(path: Path) -> Iterator[bytes]:
    """The whole lines of a file, about `_BLOCK_BYTES` at a time."""
    with open(path, "rb") as f:
        while data := f.read(_BLOCK_BYTES):
            parts = [data]  # a line longer than a block is read to its end
            while b"\n" not in parts[-1] and (more := f.read(_BLOCK_BYTES)):
                parts.append(more)
            data = b"".join(parts) if len(parts) > 1 else data
            end = data.rfind(b"\n") + 1 or len(data)
            if end < len(data):
                f.seek(end - len(data), 1)  # the unfinished line starts the next block
                data = data[:end]
            yield data


def _jsonl_batch(data: bytes, ends, first: int, job: "Job"):
    """(ok, rejected) of a block of JSON Lines (its lines end at `ends`) starting at line `first`."""
    import numpy as np
    import polars as pl

    buf = np.frombuffer(data, dtype=np.uint8)
    starts = np.concatenate(([0], ends[:-1] + 1))
    numbers = np.arange(first, first + len(ends))
    # Lines the JSON reader takes: an object (`{` first) within the size limit (counting a
    # trailing \r, which the row path leaves out). Blank lines, leading spaces, other values and
    # oversized lines are read by `_jsonl_item`, as in the row path.
    sizes = ends - starts
    regular = sizes > 0
    regular[regular] = (buf[starts[regular]] == ord("{")) & (sizes[regular] <= job.max_row_bytes)
    others = {i: _jsonl_item(int(numbers[i]), data[starts[i]:ends[i]], job.max_row_bytes)
              for i in np.flatnonzero(~regular).tolist()}
    counted = regular.copy()  # the lines that are rows (not blank): what `limit` counts
    counted[list(others)] = [item is not None for item in others.values()]
    rows = int(counted.sum())
    taken = job.budget.take_many(rows)
    if taken < rows:
        within = np.cumsum(counted) <= taken
        regular &= within
        others = {i: item for i, item in others.items() if within[i]}
    job.progress.advance(taken)
    others = [item for item in others.values() if item is not None]

    positions = np.flatnonzero(regular)  # the lines given to the JSON reader, its rows

    def raw(i):  # the bytes of row i
        return data[starts[positions[i]]:ends[positions[i]]]

    def items_of(indices):
        return [_jsonl_item(int(numbers[positions[i]]), raw(i), job.max_row_bytes) for i in indices]

    def payload(indices):
        if len(indices) == len(ends):
            return data  # every line of the block: no copy
        return b"\n".join(raw(i) for i in indices)

    def read(indices):
        return _read_json_lines(payload(indices), len(indices), int(sizes.max(initial=0)))

    everything = np.arange(len(positions))
    frame = read(everything) if len(positions) else pl.DataFrame()
    if frame is None:
        # A line the JSON reader refuses (bad JSON, a type that changes from row to row, a
        # value Python reads otherwise): read every line in Python; then the good ones by
        # columns again, unless they are what the JSON reader refused.
        items = items_of(everything)
        good = np.array([k for k, item in enumerate(items) if item[2] is None], dtype=np.int64)
        bad = [item for item in items if item[2] is not None]
        frame = read(good) if bad and len(good) else None
        if frame is None:
            return _by_columns(job, pl.DataFrame(), np.array([], dtype=np.int64), lambda _: [], [*items, *others])
        others += bad
        positions = positions[good]
    return _by_columns(job, frame, numbers[positions], items_of, others,
                       reparse=lambda indices: read(indices))


def _read_json_lines(payload: bytes, rows: int, longest: int):
    """JSON Lines of objects as a DataFrame, with the values and types that Python's json and
    `pl.DataFrame(dicts)` give them; None when that is not certain."""
    import pyarrow as pa
    import pyarrow.json as pj
    import polars as pl

    if not payload.isascii() and not _valid_utf8(payload):
        return None  # pyarrow does not always check: the row path finds the lines and says why
    # One thread: with several, pyarrow may order the columns otherwise than they first appear
    # (the row path's order); on 2 cores it measured no faster. A row must fit in a block.
    options = pj.ReadOptions(block_size=max(_JSON_BLOCK_BYTES, 2 * longest + 1), use_threads=False)
    try:
        table = pj.read_json(pa.BufferReader(payload), read_options=options)
        # pyarrow reads ISO dates in text as timestamps; Python keeps the text: read them as text
        schema = _json_text_types(table.schema)
        if schema is None:
            return None
        if schema != table.schema:
            table = pj.read_json(pa.BufferReader(payload), read_options=options,
                                 parse_options=pj.ParseOptions(explicit_schema=schema))
    except (pa.ArrowException, ValueError):  # pyarrow is strict: a type conflict is an error too
        return None
    if table.num_rows != rows or "" in table.column_names:
        return None  # a line holding more than one object; a key "" (Polars would rename it)
    frame = pl.from_arrow(table)
    if frame.height != rows or not all(_floats_as_python(s) for s in frame.get_columns()):
        return None
    return frame


def _valid_utf8(data: bytes) -> bool:
    """Whether `data` is UTF-8 as Python's strict decoder has it, checked by Arrow without
    building a Python string of it."""
    import pyarrow as pa

    offsets = pa.array([0, len(data)], pa.int64()).buffers()[1]
    try:
        pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)]).cast(pa.large_string())
    except pa.ArrowInvalid:
        return False
    return True


def _json_text_types(schema):
    """`schema` with dates and times as text, or None for a type Python's json would not give."""
    import pyarrow as pa

    def text(kind):
        if pa.types.is_temporal(kind):
            return pa.string()
        if pa.types.is_list(kind):
            inner = text(kind.value_type)
            return None if inner is None else pa.list_(inner)
        if pa.types.is_struct(kind):
            fields = [(f.name, text(f.type)) for f in kind]
            return None if any(t is None for _, t in fields) else pa.struct(fields)
        simple = (pa.types.is_null, pa.types.is_boolean, pa.types.is_int64, pa.types.is_float64, pa.types.is_string)
        return kind if any(test(kind) for test in simple) else None

    fields = [(f.name, text(f.type)) for f in schema]
    return None if any(t is None for _, t in fields) else pa.schema(fields)


def _floats_as_python(series) -> bool:
    """Whether the floats of a column (nested ones too) are surely what Python's json reads:
    pyarrow reads `-0` as -0.0 in a column of floats (Python: the integer 0), integers beyond
    2**63 as floats, and accepts `Inf` and `-NaN`, which Python refuses."""
    import polars as pl

    dtype = series.dtype
    if isinstance(dtype, pl.List):
        return _floats_as_python(series.explode())
    if isinstance(dtype, pl.Struct):
        return all(_floats_as_python(series.struct.field(f.name)) for f in dtype.fields)
    if dtype != pl.Float64:
        return True
    doubtful = ~series.is_finite() | (series.abs() >= 2.0**53) | ((series == 0) & (1.0 / series < 0))
    return not doubtful.any()


class JsonArrayReader(FileReader):
    """A .json file holding one array of objects; rows are numbered from 1."""

    def __init__(self, path: Path):
        import json

        try:
            data = json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DatamillError(f"{path} is not valid JSON ({err}); for one object per line use .jsonl") from None
        if not isinstance(data, list):
            raise DatamillError(f"{path} holds a JSON {_json_type(data)}; expected an array of objects "
                                "(or JSON Lines: one object per line)")
        self.data = data

    def count_rows(self) -> int:
        return len(self.data)

    def items(self, max_row_bytes: int):
        from datamill.records import oversized_reason, row_bytes

        for number, row in enumerate(self.data, 1):
            if not isinstance(row, dict):
                yield number, row, f"row is a JSON {_json_type(row)}, expected an object"
                continue
            size = row_bytes(row)
            if size > max_row_bytes:
                yield number, row, oversized_reason(size, max_row_bytes)
                continue
            yield number, row, None


class CsvReader(FileReader):
    """CSV with a header line, parsed record by record with Python's csv module so that a bad
    record (wrong number of fields, text after a closing quote, invalid UTF-8, an unterminated
    quote) is one rejected row numbered by the file line where it starts, not a failed step.
    Values stay text; `schema: raw` infers column types from the good rows afterwards."""

    def __init__(self, path: Path):
        self.path = path
        self.header: list[str] | None = None  # known once `items` has read the first record
        self.header_line = 0

    def count_rows(self) -> int:
        return max(_count_lines(self.path) - 1, 0)  # a record per line after the header, mostly

    def items(self, max_row_bytes: int):
        import csv

        from datamill.records import oversized_reason

        # A record is bounded by max_row_bytes below; csv's own 128 KiB field limit would
        # reject long texts with a less useful message.
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
        with open(self.path, "rb") as f:
            consumed: list[bytes] = []  # the raw lines of the record being parsed

            def lines():
                for number, raw in enumerate(f, 1):
                    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
                        raw = raw[3:]
                    consumed.append(raw)
                    # surrogateescape keeps bad bytes parseable; the record is checked as UTF-8 below
                    yield raw.decode("utf-8", errors="surrogateescape")

            # strict: text after a closing quote and an unterminated quote raise instead of
            # being silently glued into a field.
            reader = csv.reader(lines(), strict=True)
            start = 1  # the file line where the next record starts
            while True:
                problem = None
                try:
                    fields = next(reader)
                except StopIteration:
                    break
                except csv.Error as err:
                    fields, problem = None, self._csv_problem(err, start, reader.line_num)
                line, start = start, reader.line_num + 1
                raw = b"".join(consumed).rstrip(b"\r\n")
                consumed.clear()
                if problem is None and not fields:
                    continue  # a blank line holds no record
                if problem is None and len(raw) > max_row_bytes:
                    problem = oversized_reason(len(raw), max_row_bytes)
                if problem is None:
                    try:
                        raw.decode("utf-8")
                    except UnicodeDecodeError as err:
                        problem = _invalid_utf8(raw, err)
                if self.header is None:
                    self._set_header(fields, line, problem)
                    continue
                if problem is None and len(fields) != len(self.header):
                    problem = (f"{len(fields)} fields, but the header (line {self.header_line}) "
                               f"has {len(self.header)}")
                if problem is not None:
                    yield line, raw, problem
                    continue
                yield line, dict(zip(self.header, fields)), None

    def batches(self, job: "Job"):
        if job.schema == "raw":
            # The column types are inferred from the good rows of the whole file (`raw_frame`).
            yield from row_path_batches(self, job)
            return
        import numpy as np
        import polars as pl

        # The csv module still splits the records (its quoting rules decide which are good);
        # the normalisation is by columns, all of text as CSV values are.
        for batch in _item_batches(self.items(job.max_row_bytes), job, _TABLE_ROWS):
            good = [item for item in batch if item[2] is None]
            frame = pl.DataFrame({name: [row[name] for _, row, _ in good] for name in self.header or []},
                                 schema={name: pl.String for name in self.header or []})
            yield _by_columns(job, frame, np.array([line for line, _, _ in good], dtype=np.int64),
                              lambda indices: [good[i] for i in indices],
                              [item for item in batch if item[2] is not None])

    @staticmethod
    def _csv_problem(err, start: int, end: int) -> str:
        if "unexpected end of data" in str(err):
            return (f"unterminated quoted field starting on line {start}: every line after it, "
                    f"to the end of the file (line {end}), was read as part of it")
        return f"malformed CSV record: {err}"

    def _set_header(self, fields, line: int, problem: str | None) -> None:
        if problem is not None:
            raise DatamillError(f"{self.path} line {line}: cannot read the CSV header: {problem}")
        repeated = sorted({name for name in fields if fields.count(name) > 1})
        if repeated:
            raise DatamillError(f"{self.path} line {line}: the CSV header repeats column "
                                f"{', '.join(repr(n) for n in repeated)}; column names must be unique")
        self.header, self.header_line = fields, line

    def raw_frame(self, rows):
        import csv
        import io

        import polars as pl

        rows = [row for _, row in rows]
        if not rows:
            return pl.DataFrame(schema={name: pl.String for name in self.header or []})
        # Let Polars infer the column types of the good rows, as it would for the whole file.
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.header)
        writer.writeheader()
        writer.writerows(rows)
        return pl.read_csv(io.BytesIO(text.getvalue().encode("utf-8")), infer_schema_length=None,
                           empty_string_is_null=True)


class TableReader(FileReader):
    """An already tabular input (parquet, Arrow from `datasets`): rows numbered from 1."""

    def __init__(self, frame):
        self.frame = frame

    def count_rows(self) -> int:
        return self.frame.height

    def items(self, max_row_bytes: int):
        from datamill.records import oversized_reason, row_bytes

        for number, row in enumerate(self.frame.iter_rows(named=True), 1):
            size = row_bytes(row)
            if size > max_row_bytes:
                yield number, row, oversized_reason(size, max_row_bytes)
                continue
            yield number, row, None

    def raw_frame(self, rows):
        # Keep the input's own column types: take the good rows out of the original frame.
        numbers = [number for number, _ in rows]
        return self.frame[[n - 1 for n in numbers]] if numbers else self.frame.head(0)

    def batches(self, job: "Job"):
        import numpy as np

        from datamill.records import oversized_reason, python_types, row_bytes

        bound = _json_size_bound(self.frame.schema)
        exact = bound is None or isinstance(bound, int) and bound > job.max_row_bytes
        for start in range(0, self.frame.height, _TABLE_ROWS):
            count = job.budget.take_many(min(_TABLE_ROWS, self.frame.height - start))
            if count == 0:
                return
            job.progress.advance(count)
            frame = self.frame.slice(start, count)
            numbers = np.arange(start + 1, start + count + 1)
            # `max_row_bytes` is on the row's JSON text: a bound computed by columns clears most
            # rows; the others are measured exactly, as the row path measures them.
            if exact or isinstance(bound, int):
                unsure = np.arange(count) if exact else np.arange(0)
            else:
                unsure = np.flatnonzero((frame.select(bound > job.max_row_bytes).to_series()).to_numpy())
            oversized = []
            for i, row in zip(unsure.tolist(), frame[unsure].iter_rows(named=True)):
                size = row_bytes(row)
                if size > job.max_row_bytes:
                    oversized.append((int(numbers[i]), row, oversized_reason(size, job.max_row_bytes)))
            if oversized:
                keep = np.setdiff1d(np.arange(count), np.array([n for n, _, _ in oversized]) - start - 1)
                frame, numbers = frame[keep], numbers[keep]

            def items_of(indices, frame=frame, numbers=numbers):
                return [(int(numbers[i]), row, None) for i, row in zip(indices, frame[indices].iter_rows(named=True))]

            # `schema: raw` keeps the input's types (as `raw_frame`); normalised rows get the
            # types their values get on the row path (through Python dicts).
            yield _by_columns(job, frame, numbers, items_of, oversized,
                              retype=None if job.schema == "raw" else python_types)


def _json_size_bound(schema):
    """A bound on the size of each row as `row_bytes` measures it (json.dumps, ensure_ascii=False:
    a character takes at most 6 bytes, as an escape): an int when it is the same for every row,
    else an expression; None when a column's type has no simple bound (dates, decimals, ...:
    the rows are then measured exactly)."""
    import polars as pl

    def value(expr, dtype):
        if dtype == pl.Categorical or isinstance(dtype, pl.Enum):
            expr, dtype = expr.cast(pl.String), pl.String
        if dtype == pl.String:
            return (2 + 6 * expr.str.len_bytes()).fill_null(4)
        if dtype in (pl.Null, pl.Boolean):
            return 5  # null, false
        if dtype.is_integer():
            return 20  # -9223372036854775808
        if dtype.is_float():
            return 24  # -2.2250738585072014e-308
        if isinstance(dtype, (pl.List, pl.Array)):
            inner = value(pl.element(), dtype.inner)
            if inner is None:
                return None
            items = expr.cast(pl.List(dtype.inner))
            each = items.list.len() * (inner + 2) if isinstance(inner, int) else items.list.eval(inner + 2).list.sum()
            return (2 + each).fill_null(4)  # [a, b]
        if isinstance(dtype, pl.Struct):
            return members({f.name: f.dtype for f in dtype.fields}, expr.struct.field)
        return None

    def members(types, column):  # {"key": value, ...}
        parts = [value(column(name), dtype) for name, dtype in types.items()]
        if any(part is None for part in parts):
            return None
        return 2 + sum(2 + 6 * len(name.encode()) + 4 for name in types) + sum(parts)

    return members(dict(schema), pl.col)


def make_file_reader(file: Path, fmt: str) -> FileReader:
    import polars as pl

    if fmt == "jsonl":
        return JsonlReader(file)
    if fmt == "csv":
        # Instruction text stays text (an `input` of "42" is not a number); `schema: raw` infers types.
        return CsvReader(file)
    if fmt == "json":
        # Many ".json" files (HF exports among them) are really JSON Lines: look at the first byte.
        with open(file, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return JsonArrayReader(file) if head.startswith(b"[") else JsonlReader(file)
    if fmt == "parquet":
        try:
            return TableReader(pl.read_parquet(file))
        except (pl.exceptions.PolarsError, OSError) as err:
            raise DatamillError(f"cannot read {file} as {fmt}: {err}") from None
    raise DatamillError(f"unknown format {fmt!r}")


def frame_from_dicts(rows: list[dict]):
    import polars as pl

    if not rows:
        return pl.DataFrame()
    return pl.DataFrame(rows, infer_schema_length=None, strict=False)


def load_disk_table(path: Path, split: str):
    """A folder written by `save_to_disk` (a Dataset, or a DatasetDict and the `split` to take)."""
    import datasets

    empty = _empty_saved_split(path, split)
    if empty is not None:
        return empty
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatamillError(f"{path} has no split '{split}' (it has: {', '.join(loaded)})")
        loaded = loaded[split]
    return _dataset_to_polars(loaded)


def _empty_saved_split(path: Path, split: str):
    """A saved dataset of 0 rows as an empty table, else None. `save_to_disk` writes no data
    file for 0 rows and `load_from_disk` then fails (IndexError): take the columns from
    dataset_info.json instead, so an empty saved dataset reads as 0 rows like any empty file."""
    import json

    folder = path / split if (path / "dataset_dict.json").is_file() else path
    state = folder / "state.json"
    if not state.is_file() or json.loads(state.read_text()).get("_data_files"):
        return None
    import datasets
    import polars as pl

    info = json.loads((folder / "dataset_info.json").read_text())
    features = datasets.Features.from_dict(info.get("features") or {})
    return pl.from_arrow(features.arrow_schema.empty_table())


def load_hub_table(cfg: SourceConfig):
    """Download (or reuse the local cache of) a hub dataset split."""
    import datasets

    from datamill.secrets import read_secret_env

    token = read_secret_env(cfg.token_env) if cfg.token_env else None
    try:
        loaded = datasets.load_dataset(cfg.hf, name=cfg.hf_config, split=cfg.split,
                                       revision=cfg.revision, token=token)
    except Exception as err:
        if not _looks_offline(err):
            raise
        short = cfg.hf.rsplit("/", 1)[-1]
        raise DatamillError(
            f"cannot download dataset '{cfg.hf}' from the Hugging Face hub (offline?): {err}. "
            f"Run once with network access (the download is cached), or use a local file: "
            f"`path: data/{short}.jsonl` (JSONL, JSON, Parquet, CSV, or a save_to_disk folder)"
        ) from None
    if cfg.limit is not None and len(loaded) > cfg.limit:
        loaded = loaded.select(range(cfg.limit))
    return _dataset_to_polars(loaded)


def _looks_offline(err: Exception) -> bool:
    import os

    if isinstance(err, ConnectionError):  # datasets/huggingface_hub raise this when unreachable/offline
        return True
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout",
                "ConnectionError", "Timeout"}:
        return True
    flags = (os.environ.get("HF_DATASETS_OFFLINE", ""), os.environ.get("HF_HUB_OFFLINE", ""))
    return any(flag.upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


def _dataset_to_polars(dataset):
    import polars as pl

    # The arrow formatter applies any indices mapping (select/shuffle) that `.data` would ignore.
    return pl.from_arrow(dataset.with_format("arrow")[:])


def _top_reasons(rejected, top: int = 3) -> list[str]:
    """The most frequent distinct reasons of a rejected table: "N x reason (first: file line L)"."""
    import polars as pl

    counts = (rejected.group_by("reason", maintain_order=True)
              .agg(pl.len().alias("n"), pl.first("file"), pl.first("line"))
              .sort("n", descending=True, maintain_order=True))
    shown = [f"{n} x {_shorten(reason)} (first: {file} line {line})"
             for reason, n, file, line in counts.head(top).iter_rows()]
    if counts.height > top:
        rest = counts["n"][top:].sum()
        shown.append(f"{rest} more rows with {counts.height - top} other reasons")
    return shown


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _literal(name: str, value: str):
    import polars as pl

    return pl.lit(value, dtype=pl.String).alias(name)


def _empty_rejected():
    from datamill.records import rejected_frame

    return rejected_frame([]).with_columns(_literal("file", ""))


def _json_type(value) -> str:
    from datamill.records import json_type

    return json_type(value)
