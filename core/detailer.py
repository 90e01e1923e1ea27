"""Detailer mode of the refiner's stage 1: small regions re-denoised at the model's native resolution.

A model draws a small object (a hand, a face, a far-away sign) worst at the few latent cells it covers in the whole
picture. The Impact Pack detailer, what ComfyUI users compare with, crops the region with some context, upscales the
crop to the model's native size, re-denoises it there and pastes it back. Here the same is done per connected region
of the stage-1 mask Bi(1-P+A) (g-refine.txt eq. 10 keeps its meaning: the mask and the plan's strength are the
plan's; only *where* the model sees the region changes):

- regions are the 8-connected components of the binary mask; a region whose bounding box covers less than
  ``max_region_fraction`` of the picture is *small* and goes through the detailer; larger ones keep the in-place path;
- the crop is the bounding box grown by ``context`` times its longer side on every side (at least ``min_context``
  pixels), made square where the picture allows (models are trained on square-ish crops), clipped to the picture;
- the crop is resized so that its longer side is ``native_resolution`` (rounded to the latent factor ``multiple``),
  never smaller than the crop itself;
- after re-denoising, the crop is resized back and pasted with the region's own feathered mask (the part of the
  plan's feathered mask nearest to this region), so pixels outside every region's feathered mask are unchanged.

Shapes: masks (H, W) float/bool; pictures (H, W, 3) float in [0, 1]; boxes in picture pixels (top, left, height,
width), integer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class DetailerSettings:
    """max_region_fraction: a region whose bounding box covers less than this share of the picture is re-denoised
    in a crop (0 = never, 1 = always); native_resolution: the crop's longer side after upscaling (512 for SD1.5-class
    models, 1024 for SDXL-class); context: padding on every side as a fraction of the box's longer side;
    min_context: the least padding in pixels; multiple: the crop's upscaled sides are multiples of it (the VAE
    factor)."""

    max_region_fraction: float = 0.05
    native_resolution: int = 512
    context: float = 0.5
    min_context: int = 8
    multiple: int = 8

    def __post_init__(self) -> None:
        if not (isinstance(self.max_region_fraction, (int, float)) and 0.0 <= self.max_region_fraction <= 1.0):
            raise ValueError(f"max_region_fraction must be in [0, 1], got {self.max_region_fraction!r}.")
        if not (isinstance(self.context, (int, float)) and math.isfinite(self.context) and self.context >= 0):
            raise ValueError(f"context must be a finite number >= 0, got {self.context!r}.")
        for name in ("native_resolution", "min_context", "multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "min_context" else 1):
                raise ValueError(f"{name} must be a whole number >= {0 if name == 'min_context' else 1}, got {value!r}.")
        if self.native_resolution < self.multiple:
            raise ValueError(f"native_resolution ({self.native_resolution}) is below the latent factor "
                             f"({self.multiple}): use at least {self.multiple}, e.g. 512 for SD1.5, 1024 for SDXL.")


@dataclass(frozen=True)
class RegionCrop:
    """One small region: box (top, left, height, width) of the crop in the picture; mask (height, width) float in
    {0, 1}, the region's binary mask inside the crop; feathered (height, width) float in [0, 1], its paste weight;
    size (height, width) of the crop after upscaling, multiples of the latent factor."""

    box: tuple[int, int, int, int]
    mask: torch.Tensor
    feathered: torch.Tensor
    size: tuple[int, int]


def split_regions(binary_mask: torch.Tensor, settings: DetailerSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The binary mask's regions split by size: (small, large), each (H, W) float in {0, 1}, small + large = mask.
    A region is small when its bounding box covers less than ``max_region_fraction`` of the picture (1 = every
    region)."""
    mask = binary_mask.detach().cpu().numpy() > 0.5
    labels, count = ndi.label(mask, structure=EIGHT_CONNECTED)
    small = np.zeros_like(mask)
    picture_area = mask.shape[0] * mask.shape[1]
    for index, found in enumerate(ndi.find_objects(labels), start=1):
        rows, columns = found
        box_area = (rows.stop - rows.start) * (columns.stop - columns.start)
        if settings.max_region_fraction >= 1.0 or box_area < settings.max_region_fraction * picture_area:
            small |= labels == index
    small_mask = torch.from_numpy(small).float()
    return small_mask, binary_mask.detach().cpu().float() * (1 - small_mask)


def crop_box(region_box: tuple[int, int, int, int], picture_size: tuple[int, int],
             settings: DetailerSettings) -> tuple[int, int, int, int]:
    """The crop around a region's bounding box (top, left, height, width): grown by the context on every side, then
    squared where the picture allows, clipped to the picture (H, W)."""
    top, left, height, width = region_box
    picture_height, picture_width = picture_size
    padding = max(settings.min_context, math.ceil(settings.context * max(height, width)))
    side = max(height, width) + 2 * padding
    crop_height, crop_width = min(side, picture_height), min(side, picture_width)
    centre_y, centre_x = top + height / 2, left + width / 2
    crop_top = int(round(min(max(centre_y - crop_height / 2, 0), picture_height - crop_height)))
    crop_left = int(round(min(max(centre_x - crop_width / 2, 0), picture_width - crop_width)))
    return crop_top, crop_left, crop_height, crop_width


def upscaled_size(crop_size: tuple[int, int], settings: DetailerSettings) -> tuple[int, int]:
    """(height, width) of the crop at the model's native resolution: longer side ``native_resolution``, the aspect
    kept, each side a multiple of ``multiple`` and never below the crop's own side (rounded up to the multiple)."""
    height, width = crop_size
    scale = max(settings.native_resolution / max(height, width), 1.0)

    def snap(side: int) -> int:
        return max(settings.multiple, settings.multiple * math.ceil(round(side * scale, 6) / settings.multiple))

    return snap(height), snap(width)


def region_crops(small_mask: torch.Tensor, feathered_mask: torch.Tensor, settings: DetailerSettings) -> list[RegionCrop]:
    """One crop per region of ``small_mask`` (H, W), in raster order of the regions. Each crop's paste weight is the
    plan's feathered mask inside the crop, limited to the pixels nearer to this region than to any other small region
    (so overlapping crops never paste twice over the same pixel)."""
    mask = small_mask.detach().cpu().numpy() > 0.5
    labels, count = ndi.label(mask, structure=EIGHT_CONNECTED)
    if count == 0:
        return []
    nearest = np.ones_like(labels)  # every pixel -> the label of the nearest region pixel
    if count > 1:
        _, (rows, columns) = ndi.distance_transform_edt(labels == 0, return_indices=True)
        nearest = labels[rows, columns]
    feathered = feathered_mask.detach().cpu().float()
    crops = []
    for index, found in enumerate(ndi.find_objects(labels), start=1):
        rows_slice, columns_slice = found
        region_box = (rows_slice.start, columns_slice.start, rows_slice.stop - rows_slice.start,
                      columns_slice.stop - columns_slice.start)
        top, left, height, width = crop_box(region_box, tuple(mask.shape), settings)
        window = (slice(top, top + height), slice(left, left + width))
        own = torch.from_numpy(nearest[window] == index).float()
        crops.append(RegionCrop(
            box=(top, left, height, width),
            mask=torch.from_numpy(labels[window] == index).float(),
            feathered=feathered[window] * own,
            size=upscaled_size((height, width), settings),
        ))
    return crops


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w, C) -> (size[0], size[1], C), bicubic with antialiasing when shrinking, clamped to [0, 1] for pictures."""
    if tuple(pixels.shape[:2]) == tuple(size):
        return pixels.clone()
    resized = F.interpolate(pixels.permute(2, 0, 1)[None].float(), size=size, mode="bicubic", align_corners=False,
                            antialias=True)[0].permute(1, 2, 0)
    return resized.clamp(0, 1).to(pixels.dtype)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) in {0, 1} -> (size[0], size[1]) in {0, 1}: a cell is 1 where any of its source pixels is (nearest
    upscaling, max-pooled downscaling), so a region never shrinks away."""
    if tuple(mask.shape) == tuple(size):
        return mask.clone()
    return (F.interpolate(mask[None, None].float(), size=size, mode="area")[0, 0] > 0).float()


def paste(picture: torch.Tensor, refined_crop: torch.Tensor, crop: RegionCrop) -> torch.Tensor:
    """picture (H, W, 3) with ``refined_crop`` (crop size, 3; already resized back) blended in by the crop's
    feathered weight: ``w * refined + (1 - w) * picture`` inside the box, the picture's exact pixels elsewhere and
    wherever w = 0."""
    top, left, height, width = crop.box
    if tuple(refined_crop.shape[:2]) != (height, width):
        raise ValueError(f"The refined crop is {tuple(refined_crop.shape[:2])} but its box is {(height, width)}: "
                         f"resize it back to the box before pasting.")
    result = picture.clone()
    window = result[top:top + height, left:left + width]
    weight = crop.feathered[..., None].to(window)
    blended = weight * refined_crop.to(window) + (1 - weight) * window
    result[top:top + height, left:left + width] = torch.where(weight > 0, blended, window)
    return result
