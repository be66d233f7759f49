"""The request cache: finished generation results as append-only JSONL shards in one folder.

Each run appends to a shard of its own (`shard-<pid>-<time_ns>.jsonl`), one JSON line per
finished request, flushed as soon as it is written, so a SIGKILL loses at most the line being
written: the OS already holds every flushed line, and a torn last line is skipped on read.
(fsync, which only matters if the machine itself goes down, runs at most once a second.)
Shards are never rewritten. Reading merges every shard: per request id, a success wins over a
failure, and among equals the earliest line wins, so a request is never counted twice.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

FSYNC_EVERY_S = 1.0


class ShardStore:
    """`store.load()` -> {request id: record}; `store.append(record)`; `store.close()`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.torn_lines = 0  # unreadable lines skipped by the last load (killed writes)
        self._handle = None
        self._last_sync = 0.0

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.jsonl"))

    def load(self) -> dict[str, dict]:
        """Every finished request in the folder, by id (a success over a failure)."""
        records: dict[str, dict] = {}
        self.torn_lines = 0
        for shard in self.shards():
            with open(shard, "rb") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                        request_id = record["id"]
                    except (ValueError, KeyError, TypeError):
                        self.torn_lines += 1
                        continue
                    seen = records.get(request_id)
                    if seen is None or (seen.get("text") is None and record.get("text") is not None):
                        records[request_id] = record
        return records

    def append(self, record: dict) -> None:
        """Write one finished request (must have `id`); it survives a kill of this process at once."""
        if self._handle is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"shard-{os.getpid()}-{time.time_ns()}.jsonl"
            self._handle = open(path, "a", encoding="utf-8")
        self._handle.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._handle.flush()
        now = time.monotonic()
        if now - self._last_sync >= FSYNC_EVERY_S:
            os.fsync(self._handle.fileno())
            self._last_sync = now

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "ShardStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
