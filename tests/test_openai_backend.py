"""datagen.backends.openai_compat against the fake OpenAI-compatible server (offline, fast):
faults (429 with Retry-After, 5xx, dropped connections, slow answers, garbage bodies), 256
requests in flight, the API key kept out of every message, aborting cleanly."""

from __future__ import annotations

import asyncio
import threading
import time
import types
from collections import Counter
from email.utils import formatdate

import pytest

from datagen.backends.base import GenRequest, GenResult
from datagen.backends.openai_compat import OpenAIBackend, parse_retry_after
from datamill import secrets
from datamill.errors import DatamillError
from fake_openai_server import FakeServer, expected_content, request_key

SECRET = "sk-fake-0123456789abcdef"


def config(base_url: str, **kw) -> types.SimpleNamespace:
    """Stands in for the generate step's OpenAIConfig (same fields and defaults)."""
    fields = dict(base_url=base_url, api_key_env=None, max_in_flight=64, timeout_s=120.0,
                  max_retries=6, backoff_s=0.01)
    fields.update(kw)
    return types.SimpleNamespace(**fields)


def make_requests(n: int, prefix: str = "q") -> list[GenRequest]:
    return [GenRequest(id=f"{prefix}{i}", messages=[{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": f"{prefix} question {i}"}],
                       temperature=0.7, top_p=0.9, max_tokens=64, seed=i) for i in range(n)]


def key_of(request: GenRequest) -> str:
    return request_key(request.messages, request.seed)


def run(backend: OpenAIBackend, requests) -> dict[str, GenResult]:
    """Run and check the contract: on_result exactly once per request id, in this thread."""
    results: list[GenResult] = []
    caller = threading.get_ident()

    def on_result(result: GenResult) -> None:
        assert threading.get_ident() == caller
        results.append(result)

    backend.generate(requests, on_result)
    counts = Counter(r.id for r in results)
    assert not [i for i, c in counts.items() if c > 1], "on_result called twice for a request"
    return {r.id: r for r in results}


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("DATAMILL_FAKE_OPENAI_KEY", SECRET)
    yield "DATAMILL_FAKE_OPENAI_KEY"
    secrets._known_values.discard(SECRET)


def test_all_requests_complete_with_their_own_answer():
    requests = make_requests(300)
    with FakeServer() as server:
        backend = OpenAIBackend(config(server.base_url, max_in_flight=32), "fake-model")
        results = run(backend, iter(requests))  # an iterator: no len(), pulled lazily
    assert set(results) == {r.id for r in requests}
    for request in requests:
        result = results[request.id]
        assert result.error is None and result.attempts == 1 and result.finish_reason == "stop"
        assert result.text == expected_content(request.messages, request.seed)
        assert result.tokens_in > 0 and result.tokens_out > 0
    stats = backend.stats
    assert (stats.sent, stats.retried, stats.failed) == (300, 0, 0)
    assert stats.tokens_out == sum(r.tokens_out for r in results.values())
    assert 0 < stats.extra["peak_in_flight"] <= 32 and stats.seconds > 0
    assert len(server.log) == 300


def test_mixed_faults_every_request_ends_once_and_nothing_is_resent_after_success():
    requests = make_requests(200)
    keys = [key_of(r) for r in requests]
    planned = {
        keys[0]: ["429:0", "500"], keys[1]: ["503", "503", "drop"], keys[2]: ["drop"],
        keys[3]: ["slow"],  # answered after 2 s; the client gives up at 0.5 s and tries again
        keys[4]: ["garbage", "502"],
        keys[5]: ["500"] * 10,  # more faults than retries: fails
        keys[6]: ["slow"] * 10,  # times out every time: fails with a timeout reason
        keys[7]: ["400"],  # permanent: fails at once
    }
    # The other requests: a seeded 30% of first and second attempts get a 429/500/503/drop.
    with FakeServer(planned, slow_s=2.0, fault_rate=0.3) as server:
        backend = OpenAIBackend(config(server.base_url, timeout_s=0.5, max_retries=3), "fake-model")
        results = run(backend, requests)
        log = list(server.log)
        again = server.sent_after_success()

    assert set(results) == {r.id for r in requests}
    failed = {i: r.error for i, r in results.items() if r.text is None}
    assert set(failed) == {"q5", "q6", "q7"}
    assert failed["q5"].startswith("HTTP 500 after 4 attempts: injected 500")
    assert failed["q6"] == "timeout after 0.5s (4 attempts)"
    assert failed["q7"].startswith("HTTP 400: injected 400")
    for request in requests:
        if request.id not in failed:
            assert results[request.id].text == expected_content(request.messages, request.seed)
    attempts = {i: r.attempts for i, r in results.items()}
    assert [attempts[f"q{i}"] for i in range(8)] == [3, 4, 2, 2, 3, 4, 4, 1]

    assert again == []  # no request was sent again once it had been answered
    statuses = Counter(status for _, status in log)
    assert statuses[200] == 197 and statuses["drop"] > 2 and statuses[429] > 1 and statuses[503] > 2
    stats = backend.stats
    assert stats.sent == 200 and stats.failed == 3
    assert stats.retried == len(log) - 200  # every hit after a request's first is a retry
    assert set(stats.extra["retry_reasons"]) >= {"HTTP 429", "HTTP 500", "HTTP 503", "timeout",
                                                 "connection error", "malformed response"}


def test_permanent_400_fails_fast_without_retries():
    requests = make_requests(3)
    with FakeServer({key_of(requests[1]): ["400"]}) as server:
        backend = OpenAIBackend(config(server.base_url, backoff_s=5.0), "fake-model")
        start = time.monotonic()
        results = run(backend, requests)
        assert time.monotonic() - start < 2
        assert [s for k, s in server.log if k == key_of(requests[1])] == [400]
    assert results["q1"].text is None and results["q1"].attempts == 1
    assert results["q1"].error == f"HTTP 400: injected 400 for {key_of(requests[1])}"
    assert results["q0"].text and results["q2"].text
    assert (backend.stats.retried, backend.stats.failed) == (0, 1)


def test_256_in_flight_are_reached_and_sustained():
    requests = make_requests(1000)
    with FakeServer(delay_s=0.3) as server:  # answers slow enough that 256 pile up on a loaded machine
        backend = OpenAIBackend(config(server.base_url, max_in_flight=256), "fake-model")
        results = run(backend, requests)
        assert server.max_concurrent >= 200
    assert len(results) == 1000 and all(r.text for r in results.values())
    assert backend.stats.extra["peak_in_flight"] == 256


def test_retry_after_is_honoured_over_the_backoff():
    requests = make_requests(2)
    k0, k1 = key_of(requests[0]), key_of(requests[1])
    # backoff_s=20: if Retry-After were ignored the waits would be random in [0, 20 s).
    with FakeServer({k0: ["429:1"], k1: ["429:0"]}) as server:
        backend = OpenAIBackend(config(server.base_url, backoff_s=20.0), "fake-model")
        results = run(backend, requests)
        hits = list(server.hits)
    assert all(r.text for r in results.values())
    t0 = [h.received for h in hits if h.key == k0]
    t1 = [h.received for h in hits if h.key == k1]
    assert len(t0) == len(t1) == 2
    assert 0.9 <= t0[1] - t0[0] < 5  # waited the second the server asked for
    assert t1[1] - t1[0] < 0.5  # Retry-After: 0 means now, not a 20 s jittered backoff


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-4") == 0.0
    assert 8 <= parse_retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10.5
    assert parse_retry_after(formatdate(time.time() - 100, usegmt=True)) == 0.0
    assert parse_retry_after("soon") is None


def test_api_key_is_sent_as_bearer_and_never_appears_in_errors(secret_env):
    requests = make_requests(6)
    keys = [key_of(r) for r in requests]
    # The fake server quotes the Authorization header in its 4xx errors, as some servers do.
    with FakeServer({keys[1]: ["400"], keys[2]: ["401"], keys[3]: ["500"] * 5}, echo_auth=True) as server:
        backend = OpenAIBackend(config(server.base_url, api_key_env=secret_env, max_retries=1,
                                       max_in_flight=1), "fake-model")
        results = run(backend, requests)
        assert {h.authorization for h in server.hits} == {f"Bearer {SECRET}"}
    errors = [r.error for r in results.values() if r.error]
    assert len(errors) == 3 and all("REDACTED" in e for e in errors[:2])
    assert results["q2"].error.startswith("HTTP 401: check api_key_env: the server refused the key")
    assert not any(SECRET in e or secret_env in e for e in errors)
    assert SECRET not in repr(backend.stats)


def test_401_before_any_success_aborts_with_a_clear_message(secret_env):
    requests = make_requests(50)
    planned = {key_of(r): ["401"] * 5 for r in requests}
    with FakeServer(planned, echo_auth=True) as server:
        backend = OpenAIBackend(config(server.base_url, api_key_env=secret_env, max_in_flight=4),
                                "fake-model")
        delivered = []
        with pytest.raises(DatamillError) as info:
            backend.generate(requests, delivered.append)
        sent = len(server.log)
    message = str(info.value)
    assert message.startswith("openai backend: HTTP 401: check api_key_env")
    assert SECRET not in message and SECRET not in repr(info.value.args)
    assert delivered == [] and sent <= 4  # stopped at once, not 50 failures


def test_no_key_401_says_to_set_api_key_env():
    with FakeServer({key_of(r): ["401"] for r in make_requests(1)}) as server:
        backend = OpenAIBackend(config(server.base_url), "fake-model")
        with pytest.raises(DatamillError, match="set openai.api_key_env"):
            backend.generate(make_requests(1), lambda r: None)


def test_unreachable_server_aborts_after_the_retries_with_a_clear_message():
    with FakeServer() as server:
        url = server.base_url  # a port that was free; the server is gone after the block
    backend = OpenAIBackend(config(url, max_retries=2), "fake-model")
    delivered = []
    with pytest.raises(DatamillError, match=r"cannot connect to http://127\.0\.0\.1:\d+/v1 \(connection error "
                                            r"after 3 attempts: ClientConnectorError.*is the server running\?"):
        backend.generate(make_requests(3), delivered.append)
    assert delivered == [] and backend.stats.retried >= 2


def test_connection_errors_after_a_success_fail_only_that_request():
    requests = make_requests(4)
    with FakeServer({key_of(requests[2]): ["drop"] * 5}) as server:
        backend = OpenAIBackend(config(server.base_url, max_retries=1, max_in_flight=1), "fake-model")
        results = run(backend, requests)
    assert [r.text is None for r in results.values()] == [False, False, True, False]
    assert results["q2"].error.startswith("connection error after 2 attempts: ServerDisconnectedError")
    assert (backend.stats.failed, backend.stats.retried) == (1, 1)


def test_on_result_exception_aborts_the_run_cleanly():
    requests = make_requests(500)
    pulled = 0

    def lazily():
        nonlocal pulled
        for r in requests:
            pulled += 1
            yield r

    delivered = []

    def on_result(result):
        delivered.append(result)
        if len(delivered) == 10:
            raise RuntimeError("disk full")

    with FakeServer(delay_s=0.02) as server:
        backend = OpenAIBackend(config(server.base_url, max_in_flight=16), "fake-model")
        with pytest.raises(RuntimeError, match="disk full"):
            backend.generate(lazily(), on_result)
        time.sleep(0.1)
        hits_after_abort = len(server.log)
        time.sleep(0.2)
        assert len(server.log) == hits_after_abort  # nothing is sent any more
    assert len(delivered) == 10
    assert pulled <= 10 + 16 + 1  # workers pull one request at a time: no runaway prefetch


def test_generate_inside_a_running_event_loop_delivers_in_the_calling_thread():
    requests = make_requests(40)

    async def notebook_cell():
        with FakeServer() as server:
            backend = OpenAIBackend(config(server.base_url, max_in_flight=8), "fake-model")
            return run(backend, requests)  # run() asserts the calling thread

    results = asyncio.run(notebook_cell())
    assert len(results) == 40 and all(r.text for r in results.values())


def test_on_result_exception_inside_a_running_loop_propagates():
    async def notebook_cell():
        with FakeServer(delay_s=0.01) as server:
            backend = OpenAIBackend(config(server.base_url, max_in_flight=8), "fake-model")

            def on_result(result):
                raise ValueError("bad row")

            with pytest.raises(ValueError, match="bad row"):
                backend.generate(make_requests(100), on_result)
            return len(server.log)

    assert asyncio.run(notebook_cell()) < 100


def test_request_body_carries_sampling_params_and_seed():
    seen = []
    with FakeServer() as server:
        server.on_body = seen.append
        backend = OpenAIBackend(config(server.base_url + "/"), "fake-model")
        run(backend, [GenRequest(id="a", messages=[{"role": "user", "content": "héllo"}], temperature=0.2,
                                 top_p=0.5, max_tokens=7, seed=None)])
    assert seen == [{"model": "fake-model", "messages": [{"role": "user", "content": "héllo"}],
                     "temperature": 0.2, "top_p": 0.5, "max_tokens": 7}]  # no seed when None


# --- end to end: the generate step with backend: openai --------------------------------------

def generate_spec(name: str, base_url: str, n: int, *, tracking: bool = False, extra_openai: str = "",
                  max_failed_fraction: float = 0.0) -> str:
    return f"""\
name: {name}
tracking: {{enabled: {str(tracking).lower()}}}
steps:
  gen:
    generate:
      backend: openai
      model: fake-model
      prompts: [academic]
      n: {n}
      max_failed_fraction: {max_failed_fraction}
      openai: {{base_url: "{base_url}", max_in_flight: 4, backoff_s: 0.01{extra_openai}}}
"""


def shard_records(workspace) -> list[dict]:
    import json

    records = []
    for shard in sorted(workspace.glob("shared/generate/openai/*/shard-*.jsonl")):
        for line in shard.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line torn by the kill
                pass
    return records


def test_sigkill_mid_generation_then_rerun_equals_a_clean_run(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import datamill

    n, name = 120, "killme"
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    killed_dir.mkdir()
    clean_dir.mkdir()
    with FakeServer(delay_s=0.05) as server:
        spec = generate_spec(name, server.base_url, n)
        (killed_dir / "spec.yaml").write_text(spec)
        (clean_dir / "spec.yaml").write_text(spec)
        workspace = killed_dir / ".datamill" / name
        child = subprocess.Popen([sys.executable, "-c", "import datamill; datamill.run('spec.yaml', quiet=True)"],
                                 cwd=killed_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while len(shard_records(workspace)) < 30:
                assert child.poll() is None, child.stderr.read().decode()
                assert time.monotonic() < deadline, "no results written in 60 s"
                time.sleep(0.02)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        assert child.returncode == -signal.SIGKILL
        persisted = shard_records(workspace)
        assert 30 <= len(persisted) < n  # killed mid-generation
        hits_before_rerun = len(server.hits)

        resumed = datamill.run(killed_dir / "spec.yaml", quiet=True)
        resent = server.hits[hits_before_rerun:]
        all_hits = list(server.hits)
        clean = datamill.run(clean_dir / "spec.yaml", quiet=True)

    # Nothing that had reached the shards was asked for again; only the requests in flight at
    # the kill (at most max_in_flight) were answered twice.
    persisted_seeds = {int(r["text"].rsplit("Answer: ", 1)[1]) for r in persisted if r["text"]}
    assert len(persisted_seeds) == len(persisted)
    assert not persisted_seeds & {h.seed for h in resent}
    answered = Counter(h.seed for h in all_hits if h.status == 200)
    assert set(answered) == set(range(n)) and sum(answered.values()) <= n + 4
    stats = resumed.points[0].steps["gen"].stats
    assert stats["requests_cached"] == len(persisted) and stats["sent"] == n - len(persisted)

    resumed_rows = resumed.table("gen").sort("request_id").to_dicts()
    clean_rows = clean.table("gen").sort("request_id").to_dicts()
    assert len(resumed_rows) == n and resumed_rows == clean_rows
    assert resumed.table("gen__rejected").height == 0


def test_api_key_reaches_the_server_but_never_the_mlflow_store(tmp_path, monkeypatch, secret_env):
    import datamill

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    # Request 30 gets a 401 and request 31 a 400, both quoting the Authorization header back,
    # so the failure reasons (rejected table, MLflow samples) would carry the key if unscrubbed.
    with FakeServer({30: ["401"] * 10, 31: ["400"]}, echo_auth=True) as server:
        (tmp_path / "spec.yaml").write_text(
            generate_spec("keyed", server.base_url, 40, tracking=True, extra_openai=f", api_key_env: {secret_env}",
                          max_failed_fraction=0.1))
        result = datamill.run(tmp_path / "spec.yaml", quiet=True)
        assert {h.authorization for h in server.hits} == {f"Bearer {SECRET}"}

    rejected = result.table("gen__rejected").sort("gen_seed")
    assert rejected["gen_seed"].to_list() == [30, 31]
    reasons = rejected["reason"].to_list()
    assert "HTTP 401: check api_key_env" in reasons[0] and all(secrets.REDACTED in r for r in reasons)
    store = tmp_path / ".datamill"
    files = [p for p in store.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any("mlartifacts" in p.parts for p in files)
    # The failure reasons did reach MLflow (the rejected sample), scrubbed.
    assert any(b"injected 401" in f.read_bytes() for f in files if "mlartifacts" in f.parts)
    for f in files:
        data = f.read_bytes()
        for value in (SECRET, secret_env):
            assert value.encode() not in data, f"{value} leaked into {f}"
