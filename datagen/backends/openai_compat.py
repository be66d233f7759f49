"""`openai` backend: any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp
server, OpenAI itself), driven by aiohttp on an asyncio loop.

- A fixed pool of `max_in_flight` worker coroutines pulls requests from the caller's iterator,
  so a million-request job never holds more than `max_in_flight` requests in memory.
- One `aiohttp.ClientSession` whose connector allows exactly `max_in_flight` connections.
- Retries with full-jitter exponential backoff on 429, 5xx, timeouts, dropped connections and
  malformed bodies; `Retry-After` (seconds or HTTP date) is waited exactly when given. Other 4xx
  fail at once. A 401/403/404 before anything has succeeded aborts the run: the key, the URL or
  the model is wrong and every request would fail the same way; so does a server that cannot
  be connected to at all, once a request has used up its retries.
- Results go to `on_result` from the calling thread. Normally the loop runs right there
  (asyncio.run), so the worker coroutines call it directly; when the caller already runs a loop
  (a notebook), the loop runs in a helper thread and results are handed over through a queue.
- The API key comes from `read_secret_env(api_key_env)`, which registers it for scrubbing; it
  is only ever put in the Authorization header, never in a message.
"""

from __future__ import annotations

import asyncio
import json
import queue
import random
import threading
import time
from email.utils import parsedate_to_datetime
from typing import Callable, Iterable, Iterator

from datagen.backends.base import BackendStats, GenRequest, GenResult
from datamill.errors import DatamillError
from datamill.secrets import scrub

BACKOFF_CAP_S = 60.0  # longest jittered backoff between two attempts
RETRY_AFTER_CAP_S = 120.0  # longest server-requested wait we honour
EXCERPT_CHARS = 300  # how much of an error body goes into a failure reason
_RETRYABLE_STATUS = {408, 409, 425, 429}  # plus every 5xx (the statuses the openai SDK retries)
_FATAL_BEFORE_SUCCESS = {401, 403, 404}  # configuration errors: abort instead of failing every request


class OpenAIBackend:
    local = False  # talks to a server: built as OpenAIBackend(openai settings, model name)

    def __init__(self, config, model: str):
        self.config = config
        self.model = model
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.max_in_flight = max(1, int(config.max_in_flight))
        self.timeout_s = float(config.timeout_s)
        self.max_retries = max(0, int(config.max_retries))
        self.backoff_s = float(config.backoff_s)
        self.stats = BackendStats()
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self._key_env = getattr(config, "api_key_env", None)
        if self._key_env:
            from datamill.secrets import read_secret_env

            self._headers["Authorization"] = f"Bearer {read_secret_env(self._key_env)}"

    # ---- public interface ----
    def generate(self, requests: Iterable[GenRequest], on_result: Callable[[GenResult], None]) -> None:
        from datamill.progress import bar

        total = len(requests) if hasattr(requests, "__len__") else None
        start = time.monotonic()
        try:
            with bar(f"generate ({self.model})", total=total, unit="requests") as progress:
                def deliver(result: GenResult) -> None:
                    on_result(result)
                    progress.advance()

                try:
                    asyncio.get_running_loop()
                except RuntimeError:  # the normal case: no loop in this thread
                    asyncio.run(self._run(iter(requests), deliver))
                else:
                    self._run_in_thread(iter(requests), deliver)
        finally:
            self.stats.seconds += time.monotonic() - start

    # ---- the loop ----
    def _run_in_thread(self, requests: Iterator[GenRequest], deliver: Callable[[GenResult], None]) -> None:
        """The caller's thread already runs an event loop: run ours in a helper thread and call
        `deliver` here, in the caller's thread, as results arrive."""
        results: queue.Queue = queue.Queue()
        done = object()
        box: dict = {}

        def target() -> None:
            try:
                asyncio.run(self._run(requests, results.put, box))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = e
            finally:
                results.put(done)

        thread = threading.Thread(target=target, name="openai-backend", daemon=True)
        thread.start()
        try:
            while (item := results.get()) is not done:
                deliver(item)
        except BaseException:
            # on_result failed (or Ctrl-C): stop the helper loop, which cancels its requests.
            loop, task = box.get("loop"), box.get("task")
            if loop is not None and task is not None:
                loop.call_soon_threadsafe(task.cancel)
            thread.join()
            raise
        thread.join()
        if "error" in box:
            raise box["error"]

    async def _run(self, requests: Iterator[GenRequest], deliver: Callable[[GenResult], None],
                   box: dict | None = None) -> None:
        import aiohttp

        if box is not None:
            box["loop"], box["task"] = asyncio.get_running_loop(), asyncio.current_task()
        self._in_flight = 0
        self._any_success = False
        self._stopping = False
        connector = aiohttp.TCPConnector(limit=self.max_in_flight, limit_per_host=0)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=self._headers,
                                         raise_for_status=False) as session:
            workers = [asyncio.ensure_future(self._worker(session, requests, deliver))
                       for _ in range(self.max_in_flight)]
            try:
                # The first failure (on_result raised, the iterator raised, a fatal 401) stops all.
                finished, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
                for task in finished:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()
            finally:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)

    async def _worker(self, session, requests: Iterator[GenRequest], deliver) -> None:
        # Each worker takes the next request when it is done with its current one; the shared
        # iterator is only touched between awaits, so no two workers call next() at once.
        try:
            for request in requests:
                result = await self._one(session, request)
                if self._stopping:  # another worker failed in this same loop iteration
                    return
                deliver(result)
                if self._stopping:
                    return
        except Exception:
            # Nothing is delivered after a failure: the run is over for every worker.
            self._stopping = True
            raise

    # ---- one request ----
    def _payload(self, request: GenRequest) -> bytes:
        body = {"model": self.model, "messages": request.messages, "temperature": request.temperature,
                "top_p": request.top_p, "max_tokens": request.max_tokens}
        if request.seed is not None:
            body["seed"] = request.seed
        return json.dumps(body, ensure_ascii=False).encode()

    async def _one(self, session, request: GenRequest) -> GenResult:
        import aiohttp

        stats = self.stats
        stats.sent += 1
        payload = self._payload(request)
        attempt = 0
        while True:
            attempt += 1
            retry_after, unreachable = None, False
            self._in_flight += 1
            if self._in_flight > stats.extra.get("peak_in_flight", 0):
                stats.extra["peak_in_flight"] = self._in_flight
            try:
                async with session.post(self.url, data=payload) as response:
                    status = response.status
                    body = await response.read()
                    if status == 429 or status >= 500:
                        retry_after = response.headers.get("Retry-After")
            except (asyncio.TimeoutError, TimeoutError):  # the same class from 3.11; aiohttp's too
                kind, detail = "timeout", ""
            except (aiohttp.ClientError, OSError) as e:  # resets, disconnects, payload errors
                kind, detail = "connection error", f"{type(e).__name__}: {e}"
                unreachable = isinstance(e, aiohttp.ClientConnectorError)
            else:
                if 200 <= status < 300:
                    result = self._parse(request.id, body, attempt)
                    if result is not None:
                        self._any_success = True
                        return result
                    kind, detail = "malformed response", _excerpt(body)
                elif status in _RETRYABLE_STATUS or status >= 500:
                    kind, detail = f"HTTP {status}", _excerpt(body)
                else:
                    return self._give_up(request.id, self._client_error(status, body), attempt)
            finally:
                self._in_flight -= 1

            if attempt > self.max_retries:
                reason = _reason(kind, detail, attempt, self.timeout_s)
                if kind == "connection error" and unreachable and not self._any_success:
                    # Nothing answered, ever: the server is down or base_url is wrong. Stop here
                    # rather than fail every request after its own round of retries.
                    raise DatamillError(scrub(f"openai backend: cannot connect to {self.config.base_url} "
                                              f"({reason}); is the server running?"))
                return self._give_up(request.id, reason, attempt)
            stats.retried += 1
            reasons = stats.extra.setdefault("retry_reasons", {})
            reasons[kind] = reasons.get(kind, 0) + 1
            await asyncio.sleep(self._delay(attempt - 1, retry_after))

    def _parse(self, request_id: str, body: bytes, attempt: int) -> GenResult | None:
        """The result of a 2xx answer, or None when the body is not a chat completion."""
        try:
            data = json.loads(body)
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            usage = data.get("usage") or {}
            tokens_in, tokens_out = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return None
        self.stats.tokens_in += tokens_in
        self.stats.tokens_out += tokens_out
        return GenResult(id=request_id, text=text, tokens_in=tokens_in, tokens_out=tokens_out,
                         attempts=attempt, finish_reason=choice.get("finish_reason"))

    def _client_error(self, status: int, body: bytes) -> str:
        """A 4xx that retrying will not fix; a clear hint for the usual configuration mistakes."""
        detail = _excerpt(body)
        if status in (401, 403):
            # The variable's name stays out too: like every *_env field it is kept out of logs.
            hint = ("check api_key_env: the server refused the key it names" if self._key_env
                    else "the server wants an API key: set openai.api_key_env to the name of the "
                         "environment variable that holds it")
            reason = f"HTTP {status}: {hint}: {detail}"
        elif status == 404:
            reason = f"HTTP 404: check base_url ({self.config.base_url}) and model ({self.model}): {detail}"
        else:
            reason = f"HTTP {status}: {detail}"
        if status in _FATAL_BEFORE_SUCCESS and not self._any_success:
            raise DatamillError(scrub(f"openai backend: {reason}"))
        return reason

    def _give_up(self, request_id: str, reason: str, attempt: int) -> GenResult:
        self.stats.failed += 1
        # Reasons end up in tables and MLflow: scrub them (a server may quote the key back).
        return GenResult(id=request_id, text=None, error=scrub(reason), attempts=attempt)

    def _delay(self, retry: int, retry_after: str | None) -> float:
        """Seconds before the next attempt: what the server asked for, else full jitter."""
        if retry_after is not None:
            wanted = parse_retry_after(retry_after)
            if wanted is not None:
                return min(wanted, RETRY_AFTER_CAP_S)
        return random.uniform(0, min(BACKOFF_CAP_S, self.backoff_s * 2 ** retry))


def parse_retry_after(value: str) -> float | None:
    """`Retry-After: 3` or `Retry-After: Wed, 21 Oct 2015 07:28:00 GMT` -> seconds (>= 0)."""
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _excerpt(body: bytes) -> str:
    """The server's error message (OpenAI's {"error": {"message": ...}} when present), short."""
    text = body.decode("utf-8", "replace")
    try:
        error = json.loads(text).get("error")
        if isinstance(error, dict) and error.get("message"):
            text = str(error["message"])
        elif isinstance(error, str):
            text = error
    except (ValueError, AttributeError):
        pass
    # Scrub before truncating, so a key cut in half by the truncation cannot slip through.
    text = scrub(" ".join(text.split()))
    if len(text) > EXCERPT_CHARS:
        text = text[:EXCERPT_CHARS] + "…"
    return text or "(empty body)"


def _reason(kind: str, detail: str, attempts: int, timeout_s: float) -> str:
    if kind == "timeout":
        return f"timeout after {timeout_s:g}s ({attempts} attempts)"
    return f"{kind} after {attempts} attempts" + (f": {detail}" if detail else "")
