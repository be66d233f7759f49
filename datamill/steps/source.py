"""`source`: read a local file/folder or a Hugging Face hub dataset into a table.

With `schema: instruction` (the default) every row is normalised to the canonical
instruction schema (see `datamill/records.py`); with `schema: raw` columns are kept as they
are. Either way a row that cannot be read (invalid UTF-8, bad JSON, not an object, over
`max_row_bytes`, a CSV record with the wrong number of fields or an unterminated quote) or
normalised goes to `<name>__rejected` with its line number and the reason: nothing is dropped
silently. A source that ends with no row at all (an empty file, or every row rejected) fails
with the reasons unless `allow_empty: true`.
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
    record_schema: Literal["instruction", "raw"] = Field("instruction", alias="schema")
    """`instruction`: normalise rows to id/messages/source/provenance (+ extra columns);
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
        oks, rejects = [], []
        for label, reader in self._readers(ctx):
            if budget.exhausted:
                break
            ok, rejected = self._read_one(ctx, label, reader, budget)
            oks.append(ok)
            rejects.append(rejected.with_columns(_literal("file", label)))
        if not oks:  # a limit of rows reached before the first file, or an empty folder
            oks, rejects = [self._empty_ok()], [_empty_rejected()]
        ok, rejected = concat_frames(oks), concat_frames(rejects)
        if ok.height == 0 and not self.config.allow_empty:
            raise DatamillError(self._no_rows_message(ctx.name, rejected))
        if not ok.columns:
            # `schema: raw` with no good row of a JSON input has no columns to give the table, and
            # a Parquet file without columns is unreadable (DuckDB refuses it): fail with the reason.
            raise DatamillError(f"`schema: raw` found no good row in {self._origin()} to take the columns "
                                f"from ({rejected.height} rejected); an empty table needs columns, which "
                                "only a CSV header or a Parquet/datasets schema can give")
        ctx.write(ok)
        ctx.reject(rejected)
        ctx.stats.update({"rows_in": ok.height + rejected.height, "rows_out": ok.height,
                          "rejected": rejected.height})
        if rejected.height:
            # Shown under the step's row counts (executor `_rows_note`) and kept as an MLflow tag.
            ctx.stats["warning"] = (f"{rejected.height} of {ok.height + rejected.height} rows rejected "
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
        from datamill.progress import bar
        from datamill.records import concat_frames, normalize_frame, raw_text, rejected_frame

        parse_rejects: list[tuple] = []  # (line, reason, raw input)
        total = budget.cap(reader.count_rows())
        with bar(f"{ctx.name}: {label}", total=total) as progress:
            rows = _good_rows(reader.items(self.config.max_row_bytes), budget, progress, parse_rejects)
            if self.config.record_schema == "raw":
                ok = reader.raw_frame(rows)
                normalize_rejects = rejected_frame([])
            else:
                # The size was checked on the raw input already, so max_row_bytes=None here.
                ok, normalize_rejects = normalize_frame(rows, ctx.name, max_row_bytes=None)
        parse_rejected = rejected_frame(
            [{"line": line, "reason": reason, "raw": raw_text(raw)} for line, reason, raw in parse_rejects])
        rejected = concat_frames([parse_rejected, normalize_rejects]).sort("line", maintain_order=True)
        return ok, rejected

    def _empty_ok(self):
        import polars as pl

        from datamill.records import INSTRUCTION_SCHEMA

        return pl.DataFrame(schema=INSTRUCTION_SCHEMA if self.config.record_schema == "instruction" else {})


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


class FileReader:
    def count_rows(self) -> int | None:
        return None

    def items(self, max_row_bytes: int):
        raise NotImplementedError

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
        import json

        with open(self.path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
                    raw = raw[3:]
                raw = raw.rstrip(b"\r\n")
                if not raw.strip():
                    continue  # blank lines hold no row
                if len(raw) > max_row_bytes:
                    from datamill.records import oversized_reason

                    yield line_no, raw, oversized_reason(len(raw), max_row_bytes)
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield line_no, raw, _invalid_utf8(raw, err)
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as err:
                    yield line_no, text, f"invalid JSON: {err.msg} at column {err.colno}"
                    continue
                if not isinstance(row, dict):
                    yield line_no, text, f"line is a JSON {_json_type(row)}, expected an object"
                    continue
                yield line_no, row, None


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
