"""ComfyUI <-> core conversion, model folders, devices and progress: the one place nodes touch ComfyUI helpers."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.utils
import folder_paths

QUALITY_CLIP_FOLDER = "quality_clip"
QUALITY_PROMPTS_FOLDER = "quality_prompts"
REWARD_MODELS_FOLDER = "reward_models"
WEIGHT_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin")


def register_model_folders() -> None:
    """Register ``models/quality_clip/``, ``models/quality_prompts/`` and ``models/reward_models/`` with ComfyUI
    (idempotent)."""
    for name in (QUALITY_CLIP_FOLDER, QUALITY_PROMPTS_FOLDER, REWARD_MODELS_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)


def list_weight_files(folder: str) -> list[str]:
    """Weight files (by extension) under a registered model folder, relative names, sorted."""
    return sorted(name for name in folder_paths.get_filename_list(folder) if name.lower().endswith(WEIGHT_EXTENSIONS))


def resolve_model_file(folder: str, name: str) -> str:
    """Full path of ``name`` in the model folder ``folder``, or FileNotFoundError naming where we looked."""
    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.exists(path):
        searched = ", ".join(folder_paths.get_folder_paths(folder)) or "(no folder registered)"
        raise FileNotFoundError(
            f"'{name}' was not found in the '{folder}' model folder (searched: {searched}). Put the file there "
            f"and refresh the node, or pick one of: {list_weight_files(folder)[:10] or 'no files found'}."
        )
    return path


def paths_fingerprint(paths) -> tuple:
    """(path, modification time, size) of every file in ``paths`` ((path,) for a missing one), so a loader re-runs
    when any file it reads is replaced, added or removed under the same name."""
    fingerprint = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isfile(path):
            status = os.stat(path)
            fingerprint.append((path, status.st_mtime_ns, status.st_size))
        else:
            fingerprint.append((path,))
    return tuple(fingerprint)


def pad_to_multiple(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """Pad a ComfyUI IMAGE (B, H, W, C) or MASK (B, H, W) at the bottom and right to sides that are multiples of
    ``factor`` (a VAE's downscale factor): (B, H', W'[, C]) with H' = ceil(H / factor) * factor. The new pixels
    mirror the picture (``reflect``) where it is large enough, else repeat its edge (``replicate``, e.g. for a
    3-pixel side); the original pixels are unchanged at [:H, :W] (crop back with ``[:, :H, :W]``)."""
    height, width = pixels.shape[1], pixels.shape[2]
    pad_bottom, pad_right = -height % factor, -width % factor
    if not pad_bottom and not pad_right:
        return pixels
    mode = "reflect" if pad_bottom < height and pad_right < width else "replicate"
    channels_last = pixels.ndim == 4
    planes = pixels.movedim(-1, 1) if channels_last else pixels[:, None]  # -> (B, C, H, W)
    padded = F.pad(planes.float(), (0, pad_right, 0, pad_bottom), mode=mode).to(pixels.dtype)
    return padded.movedim(1, -1) if channels_last else padded[:, 0]  # -> (B, H', W'[, C])


def check_images(images: torch.Tensor, name: str = "image") -> torch.Tensor:
    """Validate a ComfyUI IMAGE: (B, H, W, C) float, C in {1, 3, 4}, finite. Returns (B, H, W, 3) in [0, 1]
    (grey is repeated to RGB, alpha is dropped)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"'{name}' must be an IMAGE batch of shape (B, H, W, 3), got {shape}.")
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"'{name}' is empty (shape {tuple(images.shape)}): connect a batch with at least one image.")
    if not torch.isfinite(images).all():
        bad = (~torch.isfinite(images)).flatten(1).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"'{name}' contains NaN or infinite pixels (images {bad} of the batch). The upstream node produced "
            f"invalid values: check it (e.g. a VAE decode in fp16 that overflowed) before computing quality maps."
        )
    if images.shape[-1] == 1:
        images = images.expand(-1, -1, -1, 3)
    return images[..., :3].float().clamp(0, 1)


def check_mask(mask: torch.Tensor, name: str) -> torch.Tensor:
    """Validate a ComfyUI MASK: (B, H, W) or (H, W) float, finite. Returns (B, H, W) float."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"'{name}' must be a MASK of shape (B, H, W), got {shape}.")
    mask = mask[None] if mask.ndim == 2 else mask
    if not torch.isfinite(mask).all():
        raise ValueError(f"'{name}' contains NaN or infinite values: check the node that produced it.")
    return mask.float()


def match_batches(first: torch.Tensor, second: torch.Tensor, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast a batch of 1 against a batch of B (per-image masks); any other batch mismatch is an error."""
    if first.shape[0] == second.shape[0]:
        return first, second
    if first.shape[0] == 1:
        return first.expand(second.shape[0], *first.shape[1:]), second
    if second.shape[0] == 1:
        return first, second.expand(first.shape[0], *second.shape[1:])
    raise ValueError(
        f"'{names[0]}' has a batch of {first.shape[0]} and '{names[1]}' a batch of {second.shape[0]}: they must match "
        f"(one mask per image), or one of them must be a single mask used for every image."
    )


@contextlib.contextmanager
def on_compute_device(encoder):
    """Move a helper model to ComfyUI's compute device for the call, and back to the offload device after, so it
    does not hold VRAM between runs."""
    encoder.to(comfy.model_management.get_torch_device())
    try:
        yield encoder
    finally:
        encoder.to(comfy.model_management.unet_offload_device())


def batch_chunks(batch_size: int, chunk: int, progress: bool = True):
    """Yield slices over a batch, checking for an interrupt before each and (``progress``) advancing a ComfyUI
    progress bar (which is also an interrupt point)."""
    bar = comfy.utils.ProgressBar(batch_size) if progress else None
    for start in range(0, batch_size, chunk):
        comfy.model_management.throw_exception_if_processing_interrupted()
        stop = min(start + chunk, batch_size)
        yield slice(start, stop)
        if bar is not None:
            bar.update(stop - start)
