"""A fake OpenAI-compatible chat-completions server for tests and benchmarks.

    with FakeServer(faults={key: ["429:1", "500"]}, delay_s=0.01) as server:
        backend = OpenAIBackend(config(base_url=server.base_url), "fake-model")
        ...
        server.log            # [(request_key, status), ...] for every request received
        server.max_concurrent # peak number of requests inside the handler at once

It runs an aiohttp.web server on 127.0.0.1 (a free port) in a background thread with its own
event loop, so a test can drive a client from its own thread. Answers are deterministic: the
content depends only on the request's messages and seed, so tests can check each result.

Faults are injected per request key (`request_key(messages, seed)`, a hash of the request
body's messages and seed) or per seed (an int key: handy when requests are built elsewhere, as
in the generate step, where request k has seed k): the list given says what the 1st, 2nd, ...
attempts get; later attempts succeed. Fault names:
    "429"      429 with Retry-After: 0          "429:N"  429 with Retry-After: N (seconds)
    "500", "502", "503", "504"                 5xx with a JSON error body
    "drop"     the connection is closed without any response (a reset, to the client)
    "slow"     the answer comes after `slow_s` seconds (longer than the client's timeout)
    "garbage"  200 with a body that is not JSON
    "400"      permanent: every attempt of this key gets 400 (a bad request never heals)
    "401"      401 for this attempt (with echo_auth=True, 4xx errors quote the Authorization
               header, as some real servers do, to check that the client scrubs it)
A random fault mix is also possible: `fault_rate` of the attempts (decided by a hash of
rng_seed, key and attempt number, so the same on every run whatever the arrival order) get a
fault drawn from `fault_mix`, for the first `random_fault_attempts` attempts of each key.

`python tests/fake_openai_server.py [--port N] [--delay S]` runs it in the foreground (no
logging of requests, for benchmarks) and prints its base_url on the first line of stdout.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import threading
import time
from collections import defaultdict
from typing import NamedTuple

from aiohttp import web


def request_key(messages: list[dict], seed) -> str:
    """What the server calls 'the same request': its messages and seed."""
    blob = json.dumps([messages, seed], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expected_content(messages: list[dict], seed) -> str:
    """The content the server answers for these messages and seed (tests compare to it)."""
    last_user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    echo = " ".join(last_user[:30].split())
    # The tags on lines of their own, as the generate step's `qa` parser wants them.
    return f"Question: echo {echo} [{request_key(messages, None)[:8]}]\nAnswer: {seed}"


class Hit(NamedTuple):
    key: str
    status: int | str  # an HTTP status, or "drop" / "slow" / "garbage" (no usable answer given)
    received: float  # time.monotonic() when the request arrived
    authorization: str | None
    seed: int | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    def __init__(self, faults: dict | None = None, delay_s: float = 0.0, *, slow_s: float = 3.0,
                 fault_rate: float = 0.0, fault_mix=("429", "500", "503", "drop"),
                 random_fault_attempts: int = 2, rng_seed: int = 0, record: bool = True,
                 echo_auth: bool = False, port: int | None = None):
        self.faults = {k: [v] if isinstance(v, str) else list(v) for k, v in (faults or {}).items()}
        self.delay_s, self.slow_s = delay_s, slow_s
        self.fault_rate, self.fault_mix = fault_rate, tuple(fault_mix)
        self.random_fault_attempts, self.rng_seed = random_fault_attempts, rng_seed
        self.record = record
        self.echo_auth = echo_auth  # quote the Authorization header in 4xx errors (some servers do)
        self.on_body = None  # a test may set a callable that receives each parsed request body
        self.port = port or _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.hits: list[Hit] = []
        self.attempts: dict[str, int] = defaultdict(int)
        self.concurrent = 0
        self.max_concurrent = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    # ---- what tests read ----
    @property
    def log(self) -> list[tuple[str, int | str]]:
        return [(h.key, h.status) for h in self.hits]

    def sent_after_success(self) -> list[str]:
        """Keys that were received again after they had been answered with 200 once."""
        done, again = set(), []
        for h in self.hits:
            if h.key in done:
                again.append(h.key)
            if h.status == 200:
                done.add(h.key)
        return again

    # ---- the server ----
    def _fault_for(self, key: str, seed, attempt: int) -> str | None:
        planned = self.faults.get(key) or (self.faults.get(seed) if isinstance(seed, int) else None)
        if planned:
            if "400" in planned:
                return "400"
            if attempt <= len(planned):
                return planned[attempt - 1]
            return None
        if self.fault_rate and attempt <= self.random_fault_attempts:
            rng = random.Random(f"{self.rng_seed}:{key}:{attempt}")
            if rng.random() < self.fault_rate:
                return rng.choice(self.fault_mix)
        return None

    def _hit(self, key: str, status, received: float, request: web.Request, seed=None) -> None:
        if self.record:
            self.hits.append(Hit(key, status, received, request.headers.get("Authorization"), seed))

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        received = time.monotonic()
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            return await self._answer(request, received)
        finally:
            self.concurrent -= 1

    async def _answer(self, request: web.Request, received: float) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
            messages, seed = body["messages"], body.get("seed")
        except (ValueError, KeyError, TypeError):
            self._hit("?", 400, received, request)
            return web.json_response({"error": {"message": "bad JSON body"}}, status=400)
        if self.on_body is not None:
            self.on_body(body)
        key = request_key(messages, seed)
        fault = None
        if self.faults or self.fault_rate:
            self.attempts[key] += 1
            fault = self._fault_for(key, seed, self.attempts[key])

        if fault is None or fault == "slow":
            slow = fault == "slow"
            self._hit(key, "slow" if slow else 200, received, request, seed)
            if slow or self.delay_s:
                await asyncio.sleep(self.slow_s if slow else self.delay_s)
            content = expected_content(messages, seed)
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
            return web.json_response({
                "id": f"chatcmpl-{key}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(content.split()),
                          "total_tokens": prompt_tokens + len(content.split())},
            })
        if fault == "drop":
            self._hit(key, "drop", received, request, seed)
            # Reset the connection without answering: the client sees a disconnect.
            request.transport.abort()
            raise asyncio.CancelledError  # aiohttp drops the handler quietly
        if fault == "garbage":
            self._hit(key, "garbage", received, request, seed)
            return web.Response(status=200, body=b"{not json", content_type="application/json")
        status, _, retry_after = fault.partition(":")
        status = int(status)
        self._hit(key, status, received, request, seed)
        headers = {"Retry-After": retry_after or "0"} if status == 429 else None
        message = f"injected {status} for {key}"
        if self.echo_auth and status < 500:
            message += f" (you sent Authorization: {request.headers.get('Authorization')})"
        return web.json_response({"error": {"message": message, "code": status}}, status=status,
                                 headers=headers)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _serve(self, ready: threading.Event) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        # shutdown_timeout small: "slow" handlers must not hold the test at exit.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, backlog=1024)
        await site.start()
        self._stopped = asyncio.Event()
        ready.set()
        await self._stopped.wait()
        await runner.cleanup()

    def start(self) -> FakeServer:
        ready = threading.Event()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._serve(ready))
            # Handlers still sleeping ("slow" answers) are cancelled, so closing is quiet.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

        self._thread = threading.Thread(target=main, name="fake-openai-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._stopped and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    server = FakeServer(delay_s=args.delay, record=False, port=args.port).start()
    print(server.base_url, flush=True)
    try:
        server._thread.join()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
