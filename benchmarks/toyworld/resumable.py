"""Resumable training state for the toy world's long trainings (toy-clip, the tiny-sd VAE and UNet).

One file per run, ``<work_dir>/<name>.pt``: a dict of tensors, state dicts and plain numbers (model, optimizer,
scheduler, EMA, the step, the loss history and the torch RNG state), written to a temporary name and renamed, so
a kill at any moment leaves either the previous complete checkpoint or the new one. Loaded with
``torch.load(weights_only=True)``. Data are drawn from the step number alone, so a resumed run sees exactly the
batches an uninterrupted run would and ends with the same weights.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESUME_CHOICES = ("auto", "never")


def checkpoint_path(work_dir: Path, name: str) -> Path:
    return Path(work_dir) / f"{name}.pt"


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (``<path>.tmp`` then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_state(path: Path, resume: str) -> dict[str, Any] | None:
    """The saved state when ``resume == "auto"`` and ``path`` exists, else None (a fresh start)."""
    if resume not in RESUME_CHOICES:
        raise ValueError(f"resume must be one of {RESUME_CHOICES}, got {resume!r}")
    if resume == "never" or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


class PeriodicSaver:
    """Calls ``save()`` when ``every_seconds`` passed since the last save (and always at :meth:`final`)."""

    def __init__(self, every_seconds: float, save: Callable[[], None]):
        self.every_seconds = every_seconds
        self.save = save
        self.last = time.monotonic()

    def tick(self) -> bool:
        if time.monotonic() - self.last >= self.every_seconds:
            self.save()
            self.last = time.monotonic()
            return True
        return False

    def final(self) -> None:
        self.save()
        self.last = time.monotonic()
