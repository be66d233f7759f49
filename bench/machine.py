"""What every benchmark records about where it ran, where builtin models are kept, and the tests'
fake OpenAI-compatible server for the generation benchmarks."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def model_cache() -> Path:
    """The cache `datamill run` uses (workspace.model_cache_dir): a builtin converted by the demo
    is not converted again for a benchmark."""
    from datamill.workspace import model_cache_dir

    return model_cache_dir()


def start_fake_server(delay_s: float | None = None) -> tuple[subprocess.Popen, str]:
    """tests/fake_openai_server.py in its own process (no request log), answering after `delay_s`
    (none: at once); (process, base URL) once it answers."""
    args = ["--delay", str(delay_s)] if delay_s is not None else []
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai_server.py"), *args],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    base_url = server.stdout.readline().strip()
    for _ in range(200):
        try:
            urllib.request.urlopen(base_url + "/models", timeout=1).read()
            return server, base_url
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("fake server did not answer")
