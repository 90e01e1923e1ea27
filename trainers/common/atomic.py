"""Atomic writes: a crash never leaves a half-written file or folder under its final name."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via ``<path>.tmp`` and ``os.replace`` (creating the parent folders); a failure
    removes the temporary file. Returns the path. Standard library only: the headless client uses it too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via ``<path>.tmp`` and ``os.replace``. Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    """``atomic_write_text`` of ``value`` as indented, key-sorted JSON."""
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def publish_directory(temporary: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a completely written folder ``temporary`` to ``final`` with ``os.replace`` (atomic on one file system).

    A folder already at ``final`` (left by an earlier run that died before its pointer was written) is moved aside
    and deleted only after the new one is in place, so ``final`` never holds a half-written folder.
    """
    temporary, final = Path(temporary), Path(final)
    stale = None
    if final.exists():
        stale = final.with_name(final.name + ".stale")
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(final, stale)
    os.replace(temporary, final)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)
    return final
