"""The generation request cache at scale (datagen/shards.py): a compact index says which requests
are finished, results are read back from disk batch by batch, and the step's tables are the same
as when every result was held in one dict. Crash safety, the winner rule and old caches (plain
JSONL shards, no index) are checked here; tests/test_generate.py covers the step's other rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from datagen import generate_step, prompt_library, shards
from datagen.generate_step import GenerateConfig, GenerateStep, plan_requests
from datagen.shards import ShardStore
from fake_backend import FakeBackend
from test_generate import SPEC  # the same small generate spec

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def result(i, text="ok", error=None, **extra) -> dict:
    """A cache record as the step writes it (asdict of a GenResult)."""
    return {"id": f"req-{i}", "text": text, "error": error, "tokens_in": 10, "tokens_out": 5, "attempts": 1,
            "finish_reason": None if text is None else "stop", **extra}


def failed(i, error="HTTP 500") -> dict:
    return result(i, text=None, error=error)


def write_old_shard(folder: Path, name: str, records: list[dict], tail: str = "") -> Path:
    """A shard as datamill wrote them before indexes existed: JSON lines, nothing beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"shard-{name}.jsonl"
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records) + tail)
    return path


def everything(store: ShardStore, ids) -> dict:
    """What the index says about these ids, records and all (to compare with `load()`)."""
    return store.index().read(list(ids))


# --- the index and the winner rule ------------------------------------------------------

def test_success_wins_over_failure_and_the_earliest_line_among_equals(tmp_path):
    write_old_shard(tmp_path, "1", [failed(1, "first"), result(2, "two, first"), failed(3, "a")])
    write_old_shard(tmp_path, "2", [result(1, "one"), result(2, "two, later"), failed(3, "b"), result(4)])
    store = ShardStore(tmp_path)
    index = store.index()
    found, ok = index.lookup(["req-1", "req-2", "req-3", "req-4", "req-5"])
    assert found.tolist() == [True, True, True, True, False]
    assert ok.tolist() == [True, True, False, True, False]
    got = index.read(["req-1", "req-2", "req-3", "req-5"])
    assert got["req-1"]["text"] == "one" and got["req-2"]["text"] == "two, first"
    assert got["req-3"]["error"] == "a" and "req-5" not in got
    assert got == {k: v for k, v in store.load().items() if k != "req-4"}


def test_index_agrees_with_the_whole_dict_load_on_a_mixed_cache(tmp_path):
    rng = np.random.default_rng(0)
    old = [result(i, f"old {i}") if i % 7 else failed(i) for i in range(300)]
    write_old_shard(tmp_path, "0001", old, tail='{"id":"req-9","te')  # killed mid-line
    with ShardStore(tmp_path) as store:  # a later run: retries, repeats, new requests
        for i in rng.permutation(450):
            store.append(result(int(i), f"new {i}") if i % 5 else failed(int(i), f"again {i}"))
    whole = ShardStore(tmp_path)
    expected = whole.load()
    indexed = ShardStore(tmp_path)
    assert everything(indexed, expected) == expected
    assert indexed.torn_lines == whole.torn_lines == 1
    found, ok = indexed.index().lookup(list(expected))
    assert found.all() and ok.tolist() == [r["text"] is not None for r in expected.values()]


def test_the_index_holds_no_text(tmp_path):
    """Resuming needs a few bytes per request, however long the results are."""
    short, long = tmp_path / "short", tmp_path / "long"
    for folder, size in ((short, 10), (long, 20_000)):
        with ShardStore(folder) as store:
            for i in range(500):
                store.append(result(i, "x" * size))
    small, big = ShardStore(short).index(), ShardStore(long).index()
    assert len(small) == len(big) == 500
    assert small.nbytes == big.nbytes <= 32 * 500
    for value in vars(big).values():  # numpy arrays of numbers, the shards' paths, a count
        assert (isinstance(value, np.ndarray) and value.dtype != object) or isinstance(value, (list, int))
    assert all(len(p) < 300 for p in big.paths)
    assert big.read(["req-3"])["req-3"]["text"] == "x" * 20_000  # texts stay on disk until asked for


# --- old caches, torn lines, live writers -----------------------------------------------

def test_old_jsonl_caches_load_and_are_indexed_on_first_use(tmp_path, monkeypatch):
    records = [result(i, f"text {i}") for i in range(50)] + [failed(50)]
    shard = write_old_shard(tmp_path, "123-456", records, tail='{"id":"req-51","text":"cut')
    expected = ShardStore(tmp_path).load()
    store = ShardStore(tmp_path)
    assert everything(store, expected) == expected and store.torn_lines == 1
    index_file = shard.with_suffix(".idx")  # written once: no writer holds the shard
    assert index_file.stat().st_size == 52 * shards.ENTRY.itemsize
    assert shard.read_text().endswith("cut")  # the shard itself is never rewritten

    def no_parsing(*_):
        raise AssertionError("an indexed shard is not parsed again")

    monkeypatch.setattr(shards, "_scan", no_parsing)
    again = ShardStore(tmp_path)
    assert everything(again, expected) == expected and again.torn_lines == 1


def test_a_live_shard_is_read_whole_and_its_index_left_to_its_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "FSYNC_EVERY_S", 3600.0)  # the writer indexes at most its first line
    writer = ShardStore(tmp_path)
    for i in range(20):
        writer.append(result(i))
    index_file = writer.path.with_suffix(".idx")
    before = index_file.stat().st_size
    assert before <= shards.ENTRY.itemsize
    reader = ShardStore(tmp_path)
    assert len(reader.index()) == 20  # the lines after its index parsed from the shard
    assert index_file.stat().st_size == before  # the writer holds its lock: its index is left alone
    writer.close()
    assert index_file.stat().st_size == 20 * shards.ENTRY.itemsize


def test_an_index_is_trusted_only_as_far_as_its_shard_goes(tmp_path):
    """After a power loss an index could name lines its shard lost: those are dropped and the
    shard's lines re-read from there."""
    with ShardStore(tmp_path) as store:
        for i in range(10):
            store.append(result(i))
    (shard,) = ShardStore(tmp_path).shards()
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:6]) + lines[6][:5])  # lines 6.. lost, a torn one in their place
    index_file = shard.with_suffix(".idx")
    index_file.write_bytes(index_file.read_bytes() + b"\x01\x02\x03")  # and a torn entry
    store = ShardStore(tmp_path)
    index = store.index()
    assert sorted(index.read([f"req-{i}" for i in range(10)])) == [f"req-{i}" for i in range(6)]
    assert store.torn_lines == 1


def test_sigkill_of_a_writer_loses_at_most_the_line_being_written(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from datagen.shards import ShardStore\n"
            "store = ShardStore(sys.argv[1])\n"
            "for i in range(10**9):\n"
            "    store.append({'id': f'req-{i}', 'text': 'x' * 20000, 'error': None})\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(ROOT)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(f.stat().st_size for f in tmp_path.glob("*.jsonl")) < 4_000_000:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (shard,) = tmp_path.glob("shard-*.jsonl")
    complete = [line for line in shard.read_bytes().split(b"\n")[:-1]]
    store = ShardStore(tmp_path)
    index = store.index()
    assert len(index) == len(complete) >= 100 and store.torn_lines <= 1
    assert index.lookup([f"req-{i}" for i in range(len(complete))])[1].all()
    assert shard.with_suffix(".idx").stat().st_size == (len(complete) + store.torn_lines) * shards.ENTRY.itemsize


# --- the generate step on top of it -----------------------------------------------------

@pytest.fixture
def small_windows(monkeypatch):
    """Windows and read batches of a few requests, so that a small test crosses their edges."""
    monkeypatch.setattr(generate_step, "WINDOW", 700)
    monkeypatch.setattr(generate_step, "TABLE_BATCH", 128)


def spec(folder: Path, n: int, extra: str = "") -> Path:
    if not (folder / "model").exists():  # written once: the model's identity (and so its cache) sees its files
        (folder / "model").mkdir()
        (folder / "model" / "config.json").write_text('{"model_type": "llama"}')
    path = folder / "spec.yaml"
    path.write_text(SPEC.format(n=n, extra=extra))
    return path


def run(path: Path, overrides=None):
    import datamill

    return datamill.run(path, overrides, quiet=True)


def planned(folder: Path, n: int, **changes):
    from datamill.models import model_identity

    config = GenerateConfig(model="m", prompts=["academic", "multiple_choice", "dialog", "math"], n=n, seed=7,
                            temperature=0.7, max_tokens=64, **changes)
    identity = model_identity(str((folder / "model").resolve()), folder)
    return config, plan_requests(config, [prompt_library.load(p, ROOT) for p in config.prompts], identity)


def whole_dict_tables(folder: Path, n: int, **changes):
    """The step's tables as they were built before: every result in one dict, one pass."""
    config, plan = planned(folder, n, **changes)
    (cache,) = (folder / ".datamill" / "gen" / "shared" / "generate" / "transformers").iterdir()
    step = GenerateStep("genqa", config)
    return step._tables(SimpleNamespace(name="genqa"), plan, ShardStore(cache).load())


def test_streamed_tables_equal_the_whole_dict_path(tmp_path, fake, small_windows):
    path = spec(tmp_path, 2000)
    ids = [p.request.id for p in planned(tmp_path, 3000)[1]]
    FakeBackend.fail = set(ids[5:3000:97])
    FakeBackend.truncate = set(ids[3:3000:89])
    first = run(path)  # 2000 requests over three windows, some failing
    assert [len(c) for c in FakeBackend.calls] == [700, 700, 600]
    FakeBackend.fail = set(ids[5:3000:194])  # half of them fail again, the rest now succeed
    second = run(spec(tmp_path, 3000))
    stats = second.points[0].steps["genqa"].stats
    assert stats["requests_cached"] == 2000 - 21 and stats["resent_failed"] == 21 and stats["sent"] == 1021
    rows, rejected = whole_dict_tables(tmp_path, 3000)
    assert second.table("genqa").equals(rows) and second.table("genqa__rejected").equals(rejected)
    assert rows.height > 2000 and set(rejected["reason_kind"]) >= {"request_failed", "truncated", "no_tags"}
    assert first.table("genqa").equals(whole_dict_tables(tmp_path, 2000)[0].filter(
        ~pl.col("request_id").is_in(ids[5:2000:97])))  # the first run's rows: those that did not fail then

    # everything cached: a new key (keep_truncated) for the same requests reads them all back
    FakeBackend.calls = []
    kept = run(spec(tmp_path, 3000), ["steps.genqa.generate.keep_truncated=true"])
    assert [i for call in FakeBackend.calls for i in call] == [r for r in ids if r in FakeBackend.fail]
    rows, rejected = whole_dict_tables(tmp_path, 3000, keep_truncated=True)
    assert kept.table("genqa").equals(rows) and kept.table("genqa__rejected").equals(rejected)
    assert kept.points[0].steps["genqa"].stats["rows"] == {"main": rows.height, "rejected": rejected.height}


def test_resume_after_a_kill_resends_no_finished_request(tmp_path, fake, small_windows):
    """A real `kill -9` of a run in its second window, then a re-run: no finished request is sent
    again, none is lost, and the tables are those of a clean run."""
    path = spec(tmp_path, 1500)
    script = (
        "import datamill\n"
        "from datagen import backends, generate_step\n"
        "from fake_backend import FakeBackend\n"
        "backends.BACKENDS['transformers'] = 'fake_backend:FakeBackend'\n"
        "generate_step.WINDOW, generate_step.TABLE_BATCH = 700, 128\n"
        "FakeBackend.delay_s = 0.002\n"
        f"datamill.run({str(path)!r}, quiet=True)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cache = tmp_path / ".datamill" / "gen" / "shared" / "generate"

    def lines() -> list[bytes]:
        return [line for f in cache.rglob("shard-*.jsonl") for line in f.read_bytes().split(b"\n")]

    deadline = time.monotonic() + 120
    while len(lines()) < 900 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {json.loads(line)["id"] for line in lines() if line.endswith(b"}")}
    assert 800 <= len(done_before) < 1500, proc.stderr.read().decode()[-2000:]

    result = run(path)
    sent = [i for call in FakeBackend.calls for i in call]
    all_ids = [p.request.id for p in planned(tmp_path, 1500)[1]]
    assert not set(sent) & done_before and len(sent) == len(set(sent))
    assert set(sent) | done_before == set(all_ids)
    stats = result.points[0].steps["genqa"].stats
    assert stats["requests_cached"] == len(done_before) and stats["sent"] == 1500 - len(done_before)
    assert stats["torn_lines"] <= 1
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "model").symlink_to(tmp_path / "model")  # the same model: the same requests
    FakeBackend.reset()
    clean_run = run(spec(clean, 1500))
    for table in ("genqa", "genqa__rejected"):
        assert clean_run.table(table).equals(result.table(table)), table


def test_the_windows_of_a_run_share_one_backend(tmp_path, fake, small_windows):
    run(spec(tmp_path, 1500))
    assert len(FakeBackend.calls) == 3 and len(FakeBackend.constructed) == 1
