"""Mask post-processing for the G-Refine refiner and the Focus-N-Fix region function.

G-Refine (g-refine.txt eq. 9, METHODS.md 1.4): the stage-1 mask is ``Bi(1 - P + A)``; we threshold, drop small
regions, dilate and feather it. Focus-N-Fix (focus-n-fix.txt, METHODS.md 2, region function M): Gaussian smoothing
(kernel 16, sigma 4 at 512 px), threshold, keep the main connected regions, dilate.

Conventions: every map is a ``(B, H, W)`` float tensor in [0, 1]; a 2-D ``(H, W)`` map is accepted as B=1 and the
result is then ``(1, H, W)``. Masks: 1 = change this pixel. Binary inputs count pixels > 0.5 as foreground.
Regions are 8-connected (diagonal neighbours join). Results keep the input's device and float dtype
(integer/bool inputs become the default float dtype). Connected components run on CPU (scipy.ndimage).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    """Check a map and return it as a finite float ``(B, H, W)`` tensor (2-D ``(H, W)`` -> ``(1, H, W)``)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, H, W), got {type(x).__name__}.")
    if x.dim() == 2:
        x = x.unsqueeze(0)  # (H, W) -> (1, H, W)
    if x.dim() != 3 or x.numel() == 0:
        raise ValueError(f"{name} must have shape (B, H, W) with B, H, W >= 1, got {tuple(x.shape)}; "
                         "for a ComfyUI IMAGE (B, H, W, C) pass one channel or a MASK.")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values; check the model that produced it "
                         "(e.g. run it in float32) before building a mask.")
    return x


def _check_non_negative(name: str, value: float, integer: bool = False) -> None:
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}; use 0 to disable this step.")


@dataclass(frozen=True)
class MaskSettings:
    """Settings of :func:`refine_mask` (use as ``refine_mask(P, A, **dataclasses.asdict(settings))``).

    threshold in [0, 1]; min_area (pixels) >= 0; dilation (pixels) >= 0; feather_sigma (pixels) >= 0.
    Pixel sizes are at the image's resolution: convert values given at 512 px with :func:`scale_to_resolution`.
    """

    threshold: float = 0.5
    min_area: int = 0
    dilation: int = 0
    feather_sigma: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0):
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}.")
        _check_non_negative("min_area", self.min_area, integer=True)
        _check_non_negative("dilation", self.dilation, integer=True)
        _check_non_negative("feather_sigma", self.feather_sigma)


def defect_map(perceptual_map: torch.Tensor, alignment_map: torch.Tensor) -> torch.Tensor:
    """The inside of ``Bi(.)`` in g-refine.txt eq. 9: ``clamp(1 - P + A, 0, 1)``.

    perceptual_map P: (B, H, W) in [0, 1], 1 = good quality; alignment_map A: (B, H, W) in [0, 1], 1 = must change.
    Returns (B, H, W) in [0, 1], 1 = the image must change here. Shapes must match exactly.
    """
    p = _as_batch(perceptual_map, "perceptual_map")
    a = _as_batch(alignment_map, "alignment_map")
    if p.shape != a.shape:
        raise ValueError(f"perceptual_map has shape {tuple(p.shape)} but alignment_map has shape {tuple(a.shape)}; "
                         "resize the maps to the image size (same B, H, W) before combining them.")
    if p.device != a.device:
        raise ValueError(f"perceptual_map is on {p.device} but alignment_map is on {a.device}; move both to one device.")
    return (1.0 - p + a).clamp(0.0, 1.0)


def binarize(values: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``Bi`` of g-refine.txt eq. 9: (B, H, W) values -> (B, H, W) float mask of 0/1, 1 where ``values > threshold``
    (a value equal to the threshold gives 0). threshold must be in [0, 1]."""
    MaskSettings(threshold=threshold)  # validates the threshold
    v = _as_batch(values, "values")
    return (v > threshold).to(v.dtype)


def _label_each(mask: torch.Tensor, keep) -> torch.Tensor:
    """Label 8-connected regions of each (H, W) image; ``keep(sizes) -> bool array`` over labels 1..n."""
    m = _as_batch(mask, "mask")
    fg = (m > 0.5).cpu().numpy()  # (B, H, W) bool, on CPU for scipy
    out = np.zeros(fg.shape, dtype=bool)
    for i in range(fg.shape[0]):
        labels, n = ndi.label(fg[i], structure=_EIGHT_CONNECTED)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # (n,) pixel count of labels 1..n
        kept = np.concatenate([[False], keep(sizes)])  # index 0 = background
        out[i] = kept[labels]
    return torch.from_numpy(out).to(device=m.device, dtype=m.dtype)


def remove_small_regions(mask: torch.Tensor, min_area: int) -> torch.Tensor:
    """Drop 8-connected regions with fewer than ``min_area`` pixels, per image.

    mask: (B, H, W), foreground = values > 0.5. Returns a (B, H, W) 0/1 mask. min_area 0 or 1 keeps every region.
    """
    _check_non_negative("min_area", min_area, integer=True)
    return _label_each(mask, lambda sizes: sizes >= min_area)


def keep_largest_regions(mask: torch.Tensor, max_regions: int) -> torch.Tensor:
    """Keep the ``max_regions`` largest 8-connected regions per image (focus-n-fix.txt: "keep the main connected
    regions"). Ties go to the region met first in raster order. mask: (B, H, W), foreground = values > 0.5.
    Returns a (B, H, W) 0/1 mask. max_regions must be >= 1."""
    if isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 1:
        raise ValueError(f"max_regions must be an int >= 1, got {max_regions!r}; "
                         "to keep every region skip this step.")

    def keep(sizes: np.ndarray) -> np.ndarray:
        order = np.argsort(-sizes, kind="stable")  # largest first, ties by label (raster) order
        kept = np.zeros(sizes.shape, dtype=bool)
        kept[order[:max_regions]] = True
        return kept

    return _label_each(mask, keep)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation by a disc of ``radius`` pixels (offsets with dx^2 + dy^2 <= (radius + 0.5)^2, so radius 1
    is the full 3x3 block). mask: (B, H, W), foreground = values > 0.5. Returns a (B, H, W) 0/1 mask; radius 0
    returns the binarized mask. Pixels beyond the border count as background."""
    _check_non_negative("dilation radius", radius, integer=True)
    m = (_as_batch(mask, "mask") > 0.5)
    m = m.to(torch.float32).unsqueeze(1)  # (B, 1, H, W)
    height = m.shape[2]
    out = m.clone()
    for dy in range(-radius, radius + 1):
        if abs(dy) >= height:
            continue
        half = int(math.floor(math.sqrt((radius + 0.5) ** 2 - dy * dy)))
        row = F.max_pool2d(m, (1, 2 * half + 1), stride=1, padding=(0, half))  # horizontal run, (B, 1, H, W)
        # out[y] |= row[y + dy]
        if dy >= 0:
            out[:, :, : height - dy] = torch.maximum(out[:, :, : height - dy], row[:, :, dy:])
        else:
            out[:, :, -dy:] = torch.maximum(out[:, :, -dy:], row[:, :, : height + dy])
    dtype = mask.dtype if mask.is_floating_point() else torch.get_default_dtype()
    return out.squeeze(1).to(dtype)  # (B, H, W)


def gaussian_blur(values: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) values with reflect padding; returns (B, H, W), same range bound.

    kernel_size defaults to ``2 * ceil(3 * sigma) + 1``. An even size works (focus-n-fix.txt: kernel 16, sigma 4
    at 512 px) but shifts the result by half a pixel towards the top-left. sigma 0 returns the values unchanged.
    Reflect padding needs the image larger than the padding; smaller images use replicate padding.
    The kernel is normalised, so a constant image is preserved exactly.
    """
    _check_non_negative("sigma", sigma)
    v = _as_batch(values, "values")
    if sigma == 0:
        return v
    if kernel_size is None:
        kernel_size = 2 * math.ceil(3 * sigma) + 1
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be an int >= 1 or None, got {kernel_size!r}.")
    # CPU convolutions on half precision are slow or missing: compute in float32 there.
    work = torch.float32 if (v.device.type == "cpu" and v.dtype in (torch.float16, torch.bfloat16)) else v.dtype
    x = torch.arange(kernel_size, device=v.device, dtype=work) - (kernel_size - 1) / 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()  # (k,)
    lo, hi = (kernel_size - 1) // 2, kernel_size // 2
    out = v.to(work).unsqueeze(1)  # (B, 1, H, W)
    for dim in (2, 3):  # rows, then columns
        size = out.shape[dim]
        mode = "reflect" if max(lo, hi) < size else "replicate"
        pad = (0, 0, lo, hi) if dim == 2 else (lo, hi, 0, 0)
        weight = kernel.view(1, 1, -1, 1) if dim == 2 else kernel.view(1, 1, 1, -1)
        out = F.conv2d(F.pad(out, pad, mode=mode), weight)
    return out.squeeze(1).to(v.dtype)  # (B, H, W)


def feather(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Soft blending mask: ``exp(-d^2 / (2 sigma^2))`` with d the Euclidean distance (pixels) to the nearest mask
    pixel. So it is exactly 1 on the mask (stage 1 fully re-denoises the defect, METHODS.md 1.4), continuous at the
    border (unlike ``max(blur(mask), mask)``, which jumps from 1 to ~0.5 there) and falls off as a Gaussian outside:
    0.61 at d = sigma, 0.14 at 2 sigma. mask: (B, H, W), foreground = values > 0.5. Returns (B, H, W) in [0, 1];
    sigma 0 returns the binary mask; an empty mask stays all zero."""
    _check_non_negative("feather sigma", sigma)
    m = (_as_batch(mask, "mask") > 0.5)
    dtype = mask.dtype if mask.is_floating_point() else torch.get_default_dtype()
    if sigma == 0:
        return m.to(dtype)
    fg = m.cpu().numpy()  # (B, H, W) bool, on CPU for scipy
    out = np.zeros(fg.shape, dtype=np.float64)
    for i in range(fg.shape[0]):
        if fg[i].any():
            dist = ndi.distance_transform_edt(~fg[i])  # (H, W), 0 on the mask
            out[i] = np.exp(-(dist**2) / (2.0 * sigma**2))
    return torch.from_numpy(out).to(device=m.device, dtype=dtype)


def scale_to_resolution(value: float, height: int, width: int, reference: int = 512, power: int = 1) -> float:
    """Scale a pixel quantity given at ``reference`` px (shorter side) to an image of ``height`` x ``width``:
    ``value * (min(height, width) / reference) ** power``. power 1 for lengths (kernel sizes, sigmas, radii),
    2 for areas (min_area). Round the result yourself where an int is needed."""
    for name, v in (("height", height), ("width", width), ("reference", reference)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}.")
    if power not in (1, 2):
        raise ValueError(f"power must be 1 (lengths) or 2 (areas), got {power!r}.")
    if not math.isfinite(value):
        raise ValueError(f"value must be finite, got {value!r}.")
    return float(value) * (min(height, width) / reference) ** power


def refine_mask(perceptual_map: torch.Tensor, alignment_map: torch.Tensor, threshold: float = 0.5,
                min_area: int = 0, dilation: int = 0, feather_sigma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """G-Refine stage-1 mask ``Bi(1 - P + A)`` (g-refine.txt eq. 9, METHODS.md 1.4):
    defect_map -> binarize -> remove_small_regions -> dilate -> feather.

    perceptual_map P, alignment_map A: (B, H, W) in [0, 1] (P: 1 = good; A: 1 = must change), same shape.
    Returns ``(binary, feathered)``, both (B, H, W): binary 0/1 drives what changes, feathered in [0, 1] (1 on
    binary) drives blending. An image with nothing above the threshold gets an all-zero mask (nothing to refine;
    logged at INFO). Negative min_area/dilation/feather_sigma or a threshold outside [0, 1] raise ValueError.
    """
    s = MaskSettings(threshold, min_area, dilation, feather_sigma)
    binary = binarize(defect_map(perceptual_map, alignment_map), s.threshold)
    if s.min_area > 1:
        binary = remove_small_regions(binary, s.min_area)
    if s.dilation > 0:
        binary = dilate(binary, s.dilation)
    empty = [i for i in range(binary.shape[0]) if not bool(binary[i].any())]
    if empty:
        logger.info("refine_mask: images %s have an empty mask (nothing to refine at threshold %s).",
                    empty, s.threshold)
    return binary, feather(binary, s.feather_sigma)
