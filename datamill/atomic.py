"""Files and folders that appear whole or not at all: written under a temp name next to where
they go, then renamed into place (a rename within a folder is atomic). A reader, a second run or
a crash never sees half of one."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Callable, Union


def write_atomic(path: Union[str, Path], content: Union[str, bytes, Callable[[Path], object]]) -> Path:
    """Write `content` (text, bytes, or a function that writes the file at the path it is given)
    to `path`. The temp name keeps the suffix: writers that pick a format by it (matplotlib,
    numpy) write the same file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp{path.suffix}")
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only there when writing failed
    return path


def replace_folder(tmp: Union[str, Path], final: Union[str, Path]) -> Path:
    """Move a finished temp folder to `final`, replacing what is there (a stale or older copy)."""
    final = Path(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
