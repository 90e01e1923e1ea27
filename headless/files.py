"""Atomic file writes for the headless client: a crash never leaves a half-written file under its final name.

(The trainers have the same helper in ``trainers/common/atomic.py``; headless keeps its own so that it runs from a
clone with nothing but aiohttp, see ``headless/__main__.py``.)
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text written as UTF-8) to ``path`` via ``<path>.part`` and ``os.replace``; creates
    the parent folders. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".part")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(temporary, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path
