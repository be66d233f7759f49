"""Run a local `mlflow server` on a tracking store so results can be browsed.

The server is a child process in its own process group (uvicorn may fork workers), with its
job runner off: otherwise MLflow 3.17 starts ~11 processes and ~2 GB of RAM for features we
do not use. Being in its own session, it gets none of the signals sent to `datamill ui`: `serve`
stops it on the way out, whatever ends it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from datamill.errors import DatamillError
from datamill.secrets import scrub

HEALTH_TIMEOUT_S = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_server(uri: str, artifact_root: Path, host: str = "127.0.0.1", port: int | None = None,
                 timeout: float = HEALTH_TIMEOUT_S) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` on `uri` and wait until /health answers. Returns (process, url)."""
    port = port or free_port(host)
    artifact_root = Path(artifact_root).resolve()
    artifact_root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--default-artifact-root", artifact_root.as_uri(),
           "--host", host, "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = tempfile.TemporaryFile()  # a file, not a pipe: nobody reads a pipe, so it could fill and block the server
    url = f"http://{host}:{port}"
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:  # at once: a signal turned into an exception (serve) must not leave the server behind
        proc.log = log  # type: ignore[attr-defined]  # read on failure, closed by stop_server
        _wait_healthy(proc, url, timeout)
    except BaseException:
        stop_server(proc)
        raise
    return proc, url


def stop_server(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Terminate the server's whole process group; kill it if it does not stop within `grace`."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    log = getattr(proc, "log", None)
    if log is not None:
        log.close()


def serve(uri: str, artifact_root: Path, host: str = "127.0.0.1", port: int | None = None) -> None:
    """Run the MLflow UI until Ctrl-C, SIGTERM or SIGHUP (a closed terminal); the server never
    outlives it. SIGTERM and SIGHUP exit with 128 + the signal's number (143, 129), the code a
    shell reports for a process those signals killed, once the server has stopped."""
    from rich.console import Console

    console = Console(stderr=True)
    with _exit_on(signal.SIGTERM, signal.SIGHUP):
        try:
            with console.status("starting the MLflow UI (about 10 s)"):
                proc, url = start_server(uri, artifact_root, host=host, port=port)
        except KeyboardInterrupt:
            return  # start_server already stopped the half-started server (it does on any exception)
        try:
            console.print(f"MLflow UI: [bold link={url}]{url}[/]  (Ctrl-C stops it)")
            rc = proc.wait()
            if rc != 0:
                raise DatamillError(f"mlflow server exited with code {rc}:\n{_log_tail(proc)}")
        except KeyboardInterrupt:
            return
        finally:
            stop_server(proc)  # after Ctrl-C, a signal or any error; only closes the log if it exited


@contextlib.contextmanager
def _exit_on(*signums: int):
    """Inside the block, these signals raise SystemExit(128 + signal), so `finally` clauses (and
    start_server's cleanup) stop the server. Python's default for SIGTERM and SIGHUP is to die at
    once, cleaning nothing up."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers; serve's caller then owns the signals
        return

    def handler(signum, frame):
        for s in signums:  # a second signal must not interrupt the cleanup the first one started
            signal.signal(s, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DatamillError(f"mlflow server exited with code {proc.returncode} before it answered:\n"
                                f"{_log_tail(proc)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet
        time.sleep(0.25)
    raise DatamillError(f"mlflow server did not answer {url}/health within {timeout:.0f} s:\n{_log_tail(proc)}")


def _log_tail(proc: subprocess.Popen, chars: int = 3000) -> str:
    log = getattr(proc, "log", None)
    if log is None or log.closed:
        return ""
    log.seek(0)
    return scrub(log.read().decode("utf-8", "replace")[-chars:])  # a store URI may hold a password


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session=True made the server its group leader
    except ProcessLookupError:
        pass
