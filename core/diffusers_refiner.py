"""Run a G-Refine plan (core/refine_plan.py) on a diffusers pipeline: g-refine.txt eq. 10 in scripts.

Stage 1 is masked re-denoising with the inpainting variant of the user's pipeline family
(``AutoPipelineForInpainting.from_pipe``: for a plain 4-channel UNet this is diffusers' masked img2img, which
keeps the latents outside the mask on the noised original at every step), followed by a feathered paste onto the
original pixels, so pixels outside the feathered mask are the input's. Stage 2 is global img2img with the tiny
strength delta (``AutoPipelineForImage2Image.from_pipe``). Works for the SD1.5 and SDXL pipeline classes and any
pipeline ``from_pipe`` maps; the components are shared, so no second copy of the UNet is loaded.

Inpainting checkpoints: a pipeline whose UNet takes more channels than the VAE's latents (SD/SDXL inpainting, 9 =
latents + mask + masked image) cannot run img2img, so stage 2 then uses the inpainting pipeline with an all-ones
mask (everything re-denoised, no masked-image hint: A1111's img2img with an inpainting model). Any stage-2 pipeline
that takes a ``mask_image`` is called that way.

Step counts: diffusers runs ``int(num_inference_steps * strength)`` steps of an img2img call, so a stage planned
with ``n`` steps at strength ``s`` is called with ``num_inference_steps = ceil(n / s)``.

Masks: diffusers shrinks the pixel mask to the latent grid by sampling (one pixel per cell), so thin strokes of a
mask would never be re-denoised. Stage 1 therefore gets :func:`latent_cover_mask`: every latent cell that holds any
masked pixel is masked (as the ComfyUI nodes do), expanded back to pixels.

Prompts: the plan's prompt may carry ComfyUI's emphasis syntax ``(phrase:1.1)`` (the AQ-Map's emphasized prompt),
which diffusers would read as literal text; the runner passes the plain text (``strip_emphasis``), in which the
emphasized phrases stay, repeated after the prompt.

Which stage runs for a picture: ``core.refine_plan.stage_runs``, the rule the ComfyUI nodes use too (stage 1 on a
non-empty mask at a strength > 0 with >= 1 step unless the plan skips it; stage 2 likewise, independently). A picture
neither stage runs for comes back bit-identical.

Seeds: every (stage, picture) pair gets its own generator seed, :func:`stage_seed` ``(seed, stage, index)``, so no
two stages or pictures share noise (``seed + i`` / ``seed + i + 1`` gave stage 2 of picture i the noise of stage 1 of
picture i + 1).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .keep_better import GuardDecision, GuardScores, GuardSettings, choose_attempts, guard_table, kept_pictures
from .prompt_parsing import strip_emphasis
from .refine_plan import ImagePlan, stage_runs


@dataclass(frozen=True)
class DiffusersRefinement:
    """images: (B, H, W, 3) float in [0, 1], the refined pictures (the input where the guard kept it);
    after_stage1: the same after stage 1 only (of the attempt returned); decision: the keep-better guard's per-picture
    decision and table: its Markdown table (None and "" without a guard)."""

    images: torch.Tensor
    after_stage1: torch.Tensor
    decision: GuardDecision | None = None
    table: str = ""


def scheduler_steps(planned_steps: int, strength: float) -> int:
    """``num_inference_steps`` that makes a diffusers img2img/inpaint call at ``strength`` run ``planned_steps``."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}.")
    return max(planned_steps, math.ceil(planned_steps / strength - 1e-9))


def stage_seed(seed: int, stage: int, index: int, attempt: int = 0) -> int:
    """The generator seed of picture ``index`` in stage ``stage`` (1 or 2) of attempt ``attempt`` of a run seeded
    ``seed``: 64 bits drawn from ``numpy.random.SeedSequence([seed, stage, index])`` (attempt 0) or
    ``[seed, stage, index, attempt]`` (the keep-better guard's further attempts), distinct for every tuple in practice
    and the same on every machine. seed, index, attempt >= 0."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}.")
    if seed < 0 or index < 0 or attempt < 0:
        raise ValueError(f"seed, index and attempt must be >= 0, got seed {seed}, index {index}, attempt {attempt}.")
    entropy = [int(seed), stage, int(index)] + ([int(attempt)] if attempt else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def latent_cover_mask(mask: torch.Tensor, pixels_per_latent: int) -> torch.Tensor:
    """(H, W) pixel mask (1 = change) -> (H, W) float 0/1 in which each ``pixels_per_latent`` square cell is all 1
    when any of its pixels is masked (> 0.5), else all 0. Sides not divisible by the factor keep their last partial
    cell's pixels as they are covered by the cell grid (ceil)."""
    height, width = mask.shape[-2:]
    f = int(pixels_per_latent)
    binary = (mask > 0.5).float()[None, None]  # (1, 1, H, W)
    cells = F.max_pool2d(binary, kernel_size=f, stride=f, ceil_mode=True)  # (1, 1, ceil(H/f), ceil(W/f))
    return F.interpolate(cells, scale_factor=f, mode="nearest")[0, 0, :height, :width]


def _denoises_plain_latents(pipeline) -> bool:
    """False for a pipeline whose UNet takes extra input channels (an inpainting checkpoint: latents + mask +
    masked-image latents), which diffusers' img2img pipelines cannot feed."""
    unet, vae = getattr(pipeline, "unet", None), getattr(pipeline, "vae", None)
    if unet is None or vae is None:
        return True
    return unet.config.in_channels == getattr(vae.config, "latent_channels", unet.config.in_channels)


def _takes_mask(pipeline) -> bool:
    return "mask_image" in inspect.signature(pipeline.__call__).parameters


def _stage_pipelines(pipeline, stage1_pipeline=None, stage2_pipeline=None):
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    inpaint = stage1_pipeline if stage1_pipeline is not None else AutoPipelineForInpainting.from_pipe(pipeline)
    if stage2_pipeline is not None:
        img2img = stage2_pipeline
    elif _denoises_plain_latents(pipeline):
        img2img = AutoPipelineForImage2Image.from_pipe(pipeline)
    else:  # an inpainting checkpoint: img2img would feed its 9-channel UNet 4 channels; inpaint everything instead
        img2img = AutoPipelineForInpainting.from_pipe(pipeline)
    for stage in (inpaint, img2img):
        stage.set_progress_bar_config(disable=True)
    return inpaint, img2img


def refine_with_pipeline(
    pipeline,
    images: torch.Tensor,
    plans: list[ImagePlan],
    negative_prompt: str | None = None,
    guidance_scale: float = 7.5,
    seed: int = 0,
    stage1_pipeline=None,
    stage2_pipeline=None,
    progress: bool = True,
    guard: Callable[[torch.Tensor], GuardScores] | None = None,
    guard_settings: GuardSettings = GuardSettings(),
    attempts: int = 1,
) -> DiffusersRefinement:
    """Refine each picture by its plan (eq. 10: stage 1 on the mask, then stage 2 on the whole picture).

    pipeline: a diffusers text-to-image (or img2img/inpaint) pipeline; images: (B, H, W, 3) float in [0, 1], H and W
    multiples of the VAE factor; plans: B plans; seed: picture i's generator in stage n is seeded
    :func:`stage_seed` ``(seed, n, i)``. stage1_pipeline/stage2_pipeline: override the stages (e.g. an inpainting
    checkpoint for stage 1; a stage-2 pipeline that takes ``mask_image`` gets an all-ones mask).
    Each stage runs by ``stage_runs`` (core/refine_plan.py); a picture neither stage runs for is returned
    bit-identical, and ``after_stage1`` is the input wherever stage 1 did not run.

    guard: the keep-better guard's scorer (core/keep_better.py), pictures (B, H, W, 3) in [0, 1] -> GuardScores (p,
    a and optionally a reward, e.g. from ``core.quality_maps``): the refinement is run ``attempts`` times (attempt k
    seeded ``stage_seed(seed, n, i, k)``) and each picture gets its best attempt that scores better by
    ``guard_settings``, or its input bit-identical. Without a guard ``attempts`` must be 1.
    """
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"attempts must be a whole number >= 1, got {attempts!r}.")
    if guard is None and attempts != 1:
        raise ValueError(f"attempts is {attempts} but no guard scores them: pass a guard or use attempts=1.")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) in [0, 1], got {tuple(images.shape)}.")
    if len(plans) != images.shape[0]:
        raise ValueError(f"Got {len(plans)} plans for {images.shape[0]} pictures: plan every picture.")
    for index, plan in enumerate(plans):
        if tuple(plan.binary_mask.shape) != tuple(images.shape[1:3]):
            raise ValueError(
                f"The mask of picture {index} is {tuple(plan.binary_mask.shape)} but the picture is "
                f"{tuple(images.shape[1:3])}: compute the maps on the pictures being refined."
            )
    stages = _stage_pipelines(pipeline, stage1_pipeline, stage2_pipeline)
    runs = [_refine_once(stages, images, plans, negative_prompt, guidance_scale, seed, attempt, progress)
            for attempt in range(attempts)]
    if guard is None:
        return runs[0]
    before = guard(images)
    after = [guard(run.images) for run in runs]
    decision = choose_attempts(before, after, guard_settings)
    return DiffusersRefinement(images=kept_pictures(images, [run.images for run in runs], decision),
                               after_stage1=kept_pictures(images, [run.after_stage1 for run in runs], decision),
                               decision=decision, table=guard_table(before, after, decision))


def _refine_once(stages, images: torch.Tensor, plans: list[ImagePlan], negative_prompt: str | None,
                 guidance_scale: float, seed: int, attempt: int, progress: bool) -> DiffusersRefinement:
    """One attempt of eq. 10 over the pictures (see :func:`refine_with_pipeline`)."""
    from tqdm.auto import tqdm

    inpaint, img2img = stages
    stage2_masked = _takes_mask(img2img)
    pixels_per_latent = int(getattr(inpaint, "vae_scale_factor", 8))
    after_stage1, refined = images.clone(), images.clone()
    description = "G-Refine" if attempt == 0 else f"G-Refine attempt {attempt + 1}"
    for index in tqdm(range(images.shape[0]), desc=description, disable=not progress):
        plan = plans[index]
        first, second = stage_runs(plan, 1), stage_runs(plan, 2)
        if not (first or second):
            continue  # untouched: bit-identical
        original = images[index : index + 1].permute(0, 3, 1, 2).float()  # (1, 3, H, W)
        current = original
        prompt = strip_emphasis(plan.prompt)[0]
        if first:
            mask = latent_cover_mask(plan.binary_mask, pixels_per_latent)[None, None]  # (1, 1, H, W), 1 = re-denoise
            repainted = inpaint(
                prompt=prompt,
                negative_prompt=negative_prompt,
                image=original,
                mask_image=mask,
                strength=plan.stage1_strength,
                num_inference_steps=scheduler_steps(plan.stage1_steps, plan.stage1_strength),
                guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(stage_seed(seed, 1, index, attempt)),
                height=images.shape[1],
                width=images.shape[2],
                output_type="pt",
            ).images.float().cpu()  # (1, 3, H, W) in [0, 1]
            feathered = plan.feathered_mask[None, None].float()
            current = feathered * repainted + (1 - feathered) * original
            after_stage1[index] = current[0].permute(1, 2, 0)
        if second:
            whole = {}
            if stage2_masked:  # an inpainting pipeline as stage 2: re-denoise the whole picture
                whole = {"mask_image": torch.ones_like(current[:, :1]), "height": images.shape[1],
                         "width": images.shape[2]}
            current = img2img(
                **whole,
                prompt=prompt,
                negative_prompt=negative_prompt,
                image=current,
                strength=plan.stage2_strength,
                num_inference_steps=scheduler_steps(plan.stage2_steps, plan.stage2_strength),
                guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(stage_seed(seed, 2, index, attempt)),
                output_type="pt",
            ).images.float().cpu()
        refined[index] = current[0].permute(1, 2, 0).clamp(0, 1)
    return DiffusersRefinement(images=refined, after_stage1=after_stage1)
