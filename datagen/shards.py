"""The request cache: finished generation results as append-only JSONL shards in one folder, each
with a compact index beside it, so that resuming a run of millions of requests reads 21 bytes per
request (and holds ~25) instead of every result's text.

Writing. Each run appends to a shard of its own (`shard-<pid>-<time_ns>.jsonl`), one JSON line per
finished request, flushed as soon as it is written, so a SIGKILL loses at most the line being
written: the OS already holds every flushed line, and a torn last line is skipped on read.
(fsync, which only matters if the machine itself goes down, runs at most once a second.)
Shards are never rewritten.

The index. Beside each shard, `shard-*.idx` holds one fixed-size entry per line: a 64-bit hash of
the request id, the line's offset and length, and whether the request succeeded (or the line is
unreadable). The writer appends the entries of the lines it has fsynced, right after each fsync,
so an index never names a line that is not safely in its shard, even after a power loss; it lags
its shard by at most a second of lines, which a reader parses from the shard itself (the tail).
A writer holds an flock on its shard while it writes; a reader that can take that lock knows the
shard is finished (closed, or its writer was killed) and completes the shard's index once, so
caches written before indexes existed (plain JSONL) are indexed on their first use.

Reading. `index()` merges every shard's entries into sorted numpy arrays, one winner per request
id: a success wins over a failure, and among equals the earliest line (shards in name order), so
a request is never counted twice. It holds no text; `CacheIndex.lookup` says which ids are
finished and `read_records` fetches a batch of winning lines by offset. Two different ids share a
64-bit key with a probability of about 3e-6 in a cache of 10M requests; `CacheIndex.read` checks
the full id of what it reads. `load()` still reads every record into a dict (small caches, tests).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FSYNC_EVERY_S = 1.0
FAILED, OK, UNREADABLE = 0, 1, 2  # an index entry's status
ENTRY = np.dtype([("key", "<u8"), ("offset", "<u8"), ("length", "<u4"), ("status", "u1")])  # packed: 21 bytes
_PACK = struct.Struct("<QQIB")  # the same layout, for the writer
assert _PACK.size == ENTRY.itemsize

Location = tuple[str, int, int]  # (shard path, offset, length) of one line


def id_key(request_id: str) -> int:
    """The 64-bit key the index stores for a request id."""
    return int.from_bytes(hashlib.blake2b(request_id.encode("utf-8"), digest_size=8).digest(), "little")


def id_keys(ids: list[str]) -> np.ndarray:
    """`id_key` of each id, as a uint64 array (the digests joined and read at once: faster)."""
    blake2b = hashlib.blake2b
    return np.frombuffer(b"".join(blake2b(i.encode("utf-8"), digest_size=8).digest() for i in ids), "<u8")


@dataclass
class CacheIndex:
    """Which request ids the cache holds, whether each succeeded, and where its winning line is:
    parallel numpy arrays sorted by key, no text."""

    paths: list[str]  # the shards, in name order
    keys: np.ndarray  # uint64, sorted, unique
    ok: np.ndarray  # bool: the winner is a success
    shard: np.ndarray  # uint32: index into paths
    offset: np.ndarray  # uint64
    length: np.ndarray  # uint32
    torn_lines: int  # unreadable lines skipped (killed writes)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        """Memory the index holds: a fixed few bytes per request, whatever the texts' length."""
        return sum(a.nbytes for a in (self.keys, self.ok, self.shard, self.offset, self.length))

    def _positions(self, ids: list[str]) -> np.ndarray:
        """Each id's position in the arrays, -1 where the cache does not have it."""
        if not len(self.keys):
            return np.full(len(ids), -1)
        keys = id_keys(ids)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, pos, -1)

    def lookup(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(found, ok) per id: the cache has a result for it at all; that result is a success."""
        pos = self._positions(ids)
        found = pos >= 0
        ok = np.zeros(len(ids), bool)
        ok[found] = self.ok[pos[found]]
        return found, ok

    def where(self, ids: list[str]) -> list[Location | None]:
        """Where each id's winning line is (None: not in the cache)."""
        if not len(self.keys):
            return [None] * len(ids)
        pos = self._positions(ids)
        safe = np.maximum(pos, 0)
        shard, offset, length = (a[safe].tolist() for a in (self.shard, self.offset, self.length))
        return [None if p < 0 else (self.paths[s], o, n)
                for p, s, o, n in zip(pos.tolist(), shard, offset, length)]

    def read(self, ids: list[str], newer: dict[str, Location] | None = None) -> dict[str, dict]:
        """The winning records of these ids, by id (ids the cache lacks are left out). `newer`: lines
        written since the index was made (request id -> location), which win over the index's."""
        where = self.where(ids)
        if newer:
            where = [newer.get(i, w) for i, w in zip(ids, where)]
        records = read_records(where)
        return {i: r for i, r in zip(ids, records) if r is not None and r.get("id") == i}


def read_records(locations: list[Location | None]) -> list[dict | None]:
    """The records at these places, in the order given: read in file order (one pass over the part
    of each shard they touch), each line parsed on its own."""
    records: list[dict | None] = [None] * len(locations)
    order = sorted((loc, i) for i, loc in enumerate(locations) if loc is not None)
    fds: dict[str, int] = {}
    try:
        for (path, offset, length), i in order:
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY)
            records[i] = json.loads(os.pread(fds[path], length, offset))
    finally:
        for fd in fds.values():
            os.close(fd)
    return records


class ShardStore:
    """`store.index()` -> CacheIndex; `store.append(record)`; `store.close()`; `store.load()` -> dict."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.torn_lines = 0  # unreadable lines skipped by the last load/index (killed writes)
        self.path: Path | None = None  # this store's own shard, once it has written
        self._handle = None
        self._index = None
        self._size = 0
        self._pending = bytearray()  # index entries of lines not yet fsynced
        self._last_sync = 0.0

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.jsonl"))

    # --- reading -------------------------------------------------------------------------

    def index(self) -> CacheIndex:
        """Every finished request in the folder, one winner per id, without texts (module docstring)."""
        shards = self.shards()
        parts = [self._entries(shard) for shard in shards]
        entries = np.concatenate(parts) if parts else np.empty(0, ENTRY)
        shard = np.repeat(np.arange(len(parts), dtype=np.uint32), [len(p) for p in parts])
        self.torn_lines = int(np.count_nonzero(entries["status"] == UNREADABLE))
        readable = entries["status"] != UNREADABLE
        entries, shard = entries[readable], shard[readable]
        ok = entries["status"] == OK
        # Stable sort by key, successes first: the first entry of each key is its winner (entries are
        # in shard-name and line order, so among equals the earliest line).
        order = np.lexsort((~ok, entries["key"]))
        keys = entries["key"][order]
        first = np.ones(len(keys), bool)
        first[1:] = keys[1:] != keys[:-1]
        order = order[first]
        return CacheIndex(paths=[str(s) for s in shards], keys=keys[first], ok=ok[order], shard=shard[order],
                          offset=entries["offset"][order], length=entries["length"][order],
                          torn_lines=self.torn_lines)

    def _entries(self, shard: Path) -> np.ndarray:
        """Index entries of every line of one shard: its index file, then the lines after it, parsed."""
        index_path = shard.with_suffix(".idx")
        size = shard.stat().st_size
        entries = np.empty(0, ENTRY)
        if index_path.exists():
            raw = index_path.read_bytes()
            entries = np.frombuffer(raw, ENTRY, count=len(raw) // ENTRY.itemsize)  # a torn entry is left out
            # Entries are contiguous lines from the start; keep that prefix, inside the shard.
            ends = entries["offset"] + entries["length"]
            starts = np.concatenate([np.zeros(1, np.uint64), ends[:-1]])
            good = (ends <= size) & (entries["offset"] == starts)
            entries = entries[: len(entries) if good.all() else int(np.argmin(good))]
        start = int(entries["offset"][-1] + entries["length"][-1]) if len(entries) else 0
        if start == size:
            return entries
        tail = _scan(shard, start)
        entries = np.concatenate([entries, tail])
        if _finished(shard):  # no writer will add to it: index it once and for all
            tmp = index_path.with_name(f".{index_path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(entries.tobytes())
            os.replace(tmp, index_path)
        return entries

    def load(self) -> dict[str, dict]:
        """Every finished request in the folder, by id, texts and all (a success over a failure). For
        small caches and tests: `index()` is what scales."""
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

    # --- writing -------------------------------------------------------------------------

    def append(self, record: dict) -> Location:
        """Write one finished request (must have `id`); it survives a kill of this process at once.
        Returns where its line is."""
        if self._handle is None:
            self._open()
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        offset = self._size
        self._handle.write(line)
        self._handle.flush()
        self._size += len(line)
        status = FAILED if record.get("text") is None else OK
        self._pending += _PACK.pack(id_key(record["id"]), offset, len(line), status)
        now = time.monotonic()
        if now - self._last_sync >= FSYNC_EVERY_S:
            self._sync()
            self._last_sync = now
        return str(self.path), offset, len(line)

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{os.getpid()}-{time.time_ns()}"
        # Created under a hidden name and locked before it gets its real one, so that no reader
        # ever sees it unlocked while it is being written.
        hidden = self.folder / f".{name}.jsonl"
        self._handle = open(hidden, "xb")
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # a filesystem without locks: readers then never complete this shard's index
        self.path = self.folder / f"{name}.jsonl"
        os.replace(hidden, self.path)
        self._index = open(self.path.with_suffix(".idx"), "ab", buffering=0)
        self._size = 0

    def _sync(self) -> None:
        os.fsync(self._handle.fileno())
        # Only now do the lines' entries go to the index: it never names a line that is not on disk.
        if self._pending:
            self._index.write(bytes(self._pending))
            self._pending = bytearray()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            self._sync()
            os.fsync(self._index.fileno())
            self._index.close()
            self._handle.close()  # releases the lock, after the index is complete
            self._handle = self._index = None

    def __enter__(self) -> "ShardStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scan(shard: Path, start: int) -> np.ndarray:
    """Index entries of the lines of a shard from byte `start` on, by parsing them."""
    entries = []
    offset = start
    with open(shard, "rb") as handle:
        handle.seek(start)
        for line in handle:
            try:
                record = json.loads(line)
                key, status = id_key(record["id"]), FAILED if record.get("text") is None else OK
            except (ValueError, KeyError, TypeError, AttributeError):
                key, status = 0, UNREADABLE
            entries.append((key, offset, len(line), status))
            offset += len(line)
    return np.array(entries, dtype=ENTRY)


def _finished(shard: Path) -> bool:
    """True when no writer holds the shard's lock (it closed, or was killed)."""
    with open(shard, "rb") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return True
