"""What every benchmark records about where it ran, and where builtin models are kept."""

from __future__ import annotations

import platform
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
    """The cache `datamill run examples/...` uses ($DATAMILL_MODEL_CACHE, else examples/.datamill/models):
    a builtin converted by the demo is not converted again for a benchmark."""
    from datamill.workspace import model_cache_dir

    return model_cache_dir(ROOT / "examples" / ".datamill" / "bench")
