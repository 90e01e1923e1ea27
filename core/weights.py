"""Safe weight files: read safetensors or ``weights_only`` torch files with clear errors; write atomically."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def state_dict_mismatch(state_dict, expected) -> str | None:
    """How ``state_dict`` differs from a model's ``expected`` state dict (both ``{name: tensor}``), as one readable
    phrase: counts of missing, unexpected and differently shaped keys with examples; None when they match."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    parts = (
        f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
        f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
        f"{len(mismatched)} of another shape (e.g. {mismatched[:2]})" if mismatched else "",
    )
    return "; ".join(part for part in parts if part) or None


def load_state_dict(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from ``path`` on the CPU, never executing pickled code.

    ``.safetensors`` is read with safetensors; ``.pt/.pth/.bin/.ckpt`` with ``torch.load(weights_only=True)``,
    unwrapping a ``{"state_dict": ...}`` container. Raises FileNotFoundError for a missing file and ValueError,
    naming the file and ``what`` it should have been, for anything unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The {what} '{path}' does not exist. Check the path or the model folder.")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises several private error types
            raise ValueError(
                f"The {what} '{path.name}' is not a readable safetensors file ({error}). It may be truncated or "
                f"corrupt: download or export it again."
            ) from error
    if suffix in TORCH_SUFFIXES:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as error:
            raise ValueError(
                f"The {what} '{path.name}' could not be read as a plain torch state dict ({error}). It may be corrupt, "
                f"or contain pickled code, which is refused for safety: convert it to .safetensors."
            ) from error
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
            raise ValueError(f"The {what} '{path.name}' holds a {type(loaded).__name__}, not a tensor state dict.")
        return loaded
    raise ValueError(
        f"The {what} '{path.name}' has the extension '{path.suffix}'; expected one of "
        f"{SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}."
    )


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` to ``path`` as safetensors via a temporary file and ``os.replace``: a crash never leaves
    a half-written file under the final name. Returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        # clone: safetensors refuses tensors that share memory (e.g. one prompt reused for several factors)
        save_file({key: value.detach().cpu().clone().contiguous() for key, value in tensors.items()}, str(temporary), metadata)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path
