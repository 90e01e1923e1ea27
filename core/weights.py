"""Safe weight files: read safetensors or ``weights_only`` torch files with clear errors; write atomically."""

from __future__ import annotations

import json
import os
import pickle
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


SAFETENSORS_MAX_HEADER = 100_000_000
"""safetensors refuses headers above 100 MB; a larger "header length" means the file is not safetensors at all."""
ZIP_END_RECORD = b"PK\x05\x06"
"""The zip end-of-central-directory signature: a torch ``.pt/.pth`` archive ends with it (within 64 KiB + 22 bytes)."""


def _printable_text(head: bytes) -> str | None:
    """``head`` as text when it is valid UTF-8 (a character cut at the end allowed) and at least 95 % printable
    (line breaks and tabs count), with no NUL byte, else None: weights are binary (a safetensors header length
    holds NULs, a torch archive too) and almost never decode."""
    if b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:
            return None
        text = head[: error.start].decode("utf-8")
    printable = sum(char.isprintable() or char in "\r\n\t" for char in text)
    return text if text and printable >= 0.95 * len(text) else None


def _safetensors_size(path: Path, header_length: int) -> int | None:
    """The size in bytes a safetensors file announces (8 + header + the end of its last tensor), or None when its
    header is cut or not the JSON safetensors writes."""
    with path.open("rb") as handle:
        handle.seek(8)
        raw = handle.read(header_length)
    try:
        header = json.loads(raw)
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return 8 + header_length + max(ends, default=0)


def diagnose_weight_file(path: str | os.PathLike) -> str | None:
    """What is wrong with a weights file that failed to load, from its bytes alone, as a phrase for an error message
    ("it is empty (0 bytes)", "it is a text file ...", "it is a torch zip archive cut short ..."); None when the file
    looks like an intact torch archive or safetensors file (the loader's own error then says more)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes): the copy or download did not finish"
    with path.open("rb") as handle:
        head = handle.read(512)
        handle.seek(max(0, size - (65536 + 22)))
        tail = handle.read()
    if head.startswith(b"version https://git-lfs"):
        return (f"it is a Git LFS pointer ({size} bytes of text), not the weights: fetch the real file "
                f"(git lfs pull) or download it again")
    text = _printable_text(head)
    if text is not None:
        if text.lstrip().lower().startswith(("<!doctype html", "<html")):
            return ("it is an HTML page, not weights (a download that saved an error or login page): download the "
                    "file itself again")
        snippet = " ".join(text.split())[:40]
        return f"it is a text file ({size} bytes, starting {snippet!r}), not a weights file: put the real file there"
    if head.startswith(b"PK\x03\x04"):
        if ZIP_END_RECORD not in tail:
            return (f"it is a torch zip archive cut short ({size:,} bytes, its end record is missing): the copy or "
                    f"download was interrupted; copy or download it again")
        return None
    if head.startswith(b"\x80"):
        return None  # a pickle (legacy torch file): torch.load's own error tells more
    header_length = int.from_bytes(head[:8], "little") if len(head) >= 8 else None
    if header_length is not None and header_length <= SAFETENSORS_MAX_HEADER and head[8:9] == b"{":
        expected = _safetensors_size(path, header_length)
        if expected is None or expected > size:
            return (f"it is a safetensors file cut short ({size:,} bytes, its header announces "
                    f"{'more' if expected is None else f'{expected:,}'}): the copy or download was interrupted; copy "
                    f"or download it again")
        return None
    return (f"it is neither a torch archive nor a safetensors file ({size:,} bytes starting with "
            f"{head[:8].hex(' ')}): it is corrupt or another kind of file; download or export it again")


def _describe_load_failure(path: Path, what: str, error: Exception) -> ValueError:
    """A ValueError naming the file, what is wrong with it and what to do, for a failed ``torch.load``."""
    reason = diagnose_weight_file(path)
    if reason is not None:
        return ValueError(f"The {what} '{path}' cannot be read: {reason}.")
    if isinstance(error, pickle.UnpicklingError):
        return ValueError(
            f"The {what} '{path.name}' could not be read as a plain torch state dict ({error}). It may be corrupt, or "
            f"contain pickled code, which is refused for safety: convert it to .safetensors."
        )
    return ValueError(
        f"The {what} '{path}' could not be read as a plain torch state dict ({type(error).__name__}: {error}). It "
        f"may be corrupt: copy or download it again, or convert it to .safetensors."
    )


def load_torch_file(path: str | os.PathLike, what: str = "weights file"):
    """``torch.load(path, map_location="cpu", weights_only=True)``, never executing pickled code, with every failure
    (torch raises OSError, IndexError, KeyError, RuntimeError, ... for files that are not torch archives) turned into
    a ValueError that names the file and says what is wrong with it (:func:`diagnose_weight_file`)."""
    path = Path(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of an untrusted file becomes one clear message
        raise _describe_load_failure(path, what, error) from error


def load_state_dict(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from ``path`` on the CPU, never executing pickled code.

    ``.safetensors`` is read with safetensors; ``.pt/.pth/.bin/.ckpt`` with ``torch.load(weights_only=True)``,
    unwrapping a ``{"state_dict": ...}`` container. Raises FileNotFoundError for a missing file and ValueError,
    naming the file, ``what`` it should have been and what is wrong with it, for anything unreadable.
    """
    return read_state_dict(path, what)[0]


def read_state_dict(path: str | os.PathLike, what: str = "weights file") -> tuple[dict[str, torch.Tensor], bool]:
    """``(state_dict, wrapped)``: :func:`load_state_dict`, and whether the file held the state dict in a
    ``{"state_dict": ...}`` container (the layout of e.g. the HPSv2 release; always False for safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The {what} '{path}' does not exist. Check the path or the model folder.")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu"), False
        except Exception as error:  # safetensors raises several private error types
            reason = diagnose_weight_file(path)
            raise ValueError(
                f"The {what} '{path.name}' is not a readable safetensors file: {reason}." if reason else
                f"The {what} '{path.name}' is not a readable safetensors file ({error}). It may be truncated or "
                f"corrupt: download or export it again."
            ) from error
    if suffix in TORCH_SUFFIXES:
        loaded = load_torch_file(path, what)
        wrapped = isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict)
        if wrapped:
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
            raise ValueError(f"The {what} '{path.name}' holds a {type(loaded).__name__}, not a tensor state dict.")
        return loaded, wrapped
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
