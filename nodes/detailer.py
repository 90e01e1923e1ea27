"""Detailer mode of G-Refine's stage 1 in ComfyUI: each small region of an image's stage-1 mask is cropped with
context, upscaled to the model's native resolution, re-denoised there with ComfyUI's sampler at the plan's strength
and steps, and pasted back with its feathered mask (geometry in ``core.detailer``; sampling is ``sampling.run_stage``,
the same as the in-place path). Large regions stay on the in-place path."""

from __future__ import annotations

import dataclasses

import torch

from ..core.detailer import (
    DetailerSettings,
    RegionCrop,
    paste,
    region_crops,
    resize_mask,
    resize_pixels,
    split_regions,
)
from ..core.refine_plan import ImagePlan, stage_runs
from .sampling import ConditioningFor, StageProgress, run_stage, stage_masks

AUTO_RESOLUTION = 0


def native_resolution(model, requested: int) -> int:
    """``requested``, or for 0 (auto) the model family's native side: 512 for the SD1.x/SD2 latent format, 1024 for
    the others (SDXL, SD3, Flux...)."""
    if requested != AUTO_RESOLUTION:
        return int(requested)
    latent_format = type(model.model.latent_format).__name__
    return 512 if latent_format in ("SD15",) else 1024


@dataclasses.dataclass
class DetailerPass:
    """Per image: the crops of its small regions and its plan for the in-place path (large regions only)."""

    crops: list[list[RegionCrop]]
    inplace_plans: list[ImagePlan]

    def steps(self, plans: list[ImagePlan]) -> int:
        """Sampler steps the crops will run (for the progress bar)."""
        return sum(plans[index].stage1_steps * len(crops) for index, crops in enumerate(self.crops))


def plan_detailer(plans: list[ImagePlan], settings: DetailerSettings) -> DetailerPass:
    """Split each plan's stage-1 mask into small regions (crops) and the rest (the in-place plan)."""
    crops, inplace = [], []
    for plan in plans:
        if not stage_runs(plan, 1):
            crops.append([])
            inplace.append(plan)
            continue
        small, large = split_regions(plan.binary_mask, settings)
        crops.append(region_crops(small, plan.feathered_mask, settings))
        inplace.append(dataclasses.replace(plan, binary_mask=large.to(plan.binary_mask),
                                           feathered_mask=plan.feathered_mask * (small == 0).to(plan.feathered_mask)))
    return DetailerPass(crops=crops, inplace_plans=inplace)


def detail_small_regions(model, vae, conditioning_for: ConditioningFor, images: torch.Tensor,
                         plans: list[ImagePlan], detailer: DetailerPass, seed: int, sampler_name: str,
                         scheduler: str, cfg: float, progress: StageProgress) -> torch.Tensor:
    """images (B, H, W, 3) in [0, 1] with every small region re-denoised in its crop and pasted back; pixels outside
    every crop's feathered weight are the input's exactly. Crop k of image i samples with seed + 1000 i + k (wrapped
    to ComfyUI's 64-bit seed range)."""
    factor = vae.spacial_compression_encode()
    result = images.clone()
    for index, crops in enumerate(detailer.crops):
        plan = plans[index]
        for number, crop in enumerate(crops):
            top, left, height, width = crop.box
            pixels = resize_pixels(result[index, top:top + height, left:left + width], crop.size)
            crop_plan = dataclasses.replace(plan, binary_mask=resize_mask(crop.mask, crop.size),
                                            feathered_mask=resize_mask(crop.mask, crop.size), skip_stage2=True)
            samples = vae.encode(pixels[None])  # (1, h, w, 3) -> (1, C, h/8, w/8)
            masks = stage_masks([crop_plan], tuple(samples.shape[-2:]), factor, "binary")
            sampled = run_stage(model, conditioning_for, samples, [crop_plan], 1, (seed + 1000 * index + number) % (1 << 64),
                                sampler_name, scheduler, cfg, progress, masks)
            decoded = vae.decode(sampled).reshape(1, *crop.size, 3)[0]
            result[index] = paste(result[index], resize_pixels(decoded.to(result), (height, width)), crop)
    return result
