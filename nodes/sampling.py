"""Run one stage of a G-Refine plan (core/refine_plan.py) with ComfyUI's own sampler, shared by the modular stage
nodes and the all-in-one node (nodes/refiner.py).

How a stage samples (g-refine.txt eq. 10, METHODS.md 1.4):
- ``comfy.sample.sample`` with ``steps = plan steps`` and ``denoise = plan strength``. ComfyUI's KSampler with
  ``steps=s, denoise=d < 1`` builds a schedule of ``int(s / d)`` steps and runs its last ``s``
  (``comfy.samplers.KSampler.set_steps``), so the planned step count is passed unchanged and exactly that many
  model steps run. ``d > 0.9999`` is a full schedule (start from noise).
- Stage 1 passes the plan's binary mask, reduced to latent cells, as ComfyUI's ``noise_mask`` (what SetLatentNoiseMask
  does; inpainting checkpoints read it too), then keeps the input latent bit for bit wherever that latent mask is 0
  (ComfyUI's own result there is the input only up to float error of its Euler steps and latent scaling).
- Soft mode (``mask_mode = "soft"``): the plan's feathered mask instead, reduced to latent cells by its maximum (1 on
  every cell the binary mask touches, graded around it, values under ``SOFT_MASK_FLOOR`` set to 0), on the model
  patched by ComfyUI's own Differential Diffusion (``comfy_extras.nodes_differential_diffusion``): a cell with mask
  m is re-denoised only during the last m-fraction of the steps, so the change fades out across the feathered edge
  instead of stopping at the binary one. The latent is again kept bit for bit where the latent mask is 0.
- Noise is ``comfy.sample.prepare_noise(whole latent, seed, batch_index)`` sliced per image, so image i gets the
  same noise as in a plain KSampler run over the batch. Images with the same (strength, steps, prompt) are sampled
  together as one batch; each keeps its own mask.
- Whether a stage samples an image is ``core.refine_plan.stage_runs`` (the rule the diffusers runner uses too), with
  the stage-1 mask on the latent grid: images whose plan skips the stage, with strength 0 or 0 steps (a total of 1
  step gives stage 2 none), or with an empty stage-1 latent mask are not sampled: their latent comes back unchanged.
- Prompts (eq. 7): each image's plan carries its emphasized prompt, ``(phrase:1.1)`` appended for every phrase the
  AQ-Map found missing. :func:`plan_conditioning` encodes it with a CLIP, as CLIPTextEncode would (ComfyUI parses the
  emphasis), once per distinct prompt; a connected positive conditioning overrides it (one conditioning for every
  image, no per-image emphasis), as in the all-in-one node.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.sample
import comfy.utils
import latent_preview

from ..core.refine_plan import ImagePlan, stage_runs

logger = logging.getLogger(__name__)

DEFAULT_PIXELS_PER_LATENT = 8  # SD1.x, SD2, SDXL, SD3, Flux VAEs
MASK_MODES = ("binary", "soft")
SOFT_MASK_FLOOR = 1.0 / 255.0  # feathered values below one 8-bit grey level count as "keep" (the Gaussian never reaches 0)
ConditioningFor = Callable[[str], tuple[list, list]]  # prompt -> (positive, negative)


def check_plans(plans, batch: int) -> list[ImagePlan]:
    """A REFINERY_PLAN for a latent/image batch of ``batch``: one plan per image, or one plan for all."""
    fields = ImagePlan.__dataclass_fields__  # duck-typed: the pack may be loaded under two module names
    if not isinstance(plans, (list, tuple)) or not plans or not all(all(hasattr(p, f) for f in fields) for p in plans):
        raise ValueError(f"'plan' must be a REFINERY_PLAN from the Refine Plan node (a list of image plans), "
                         f"got {type(plans).__name__}.")
    if len(plans) == 1 and batch > 1:
        return list(plans) * batch
    if len(plans) != batch:
        raise ValueError(
            f"The plan covers {len(plans)} images but the latent holds a batch of {batch}: make the plan from the "
            f"same images you VAE-encode (one plan per image, or a single plan for every image)."
        )
    return list(plans)


def check_latent(latent, model, name: str = "latent") -> torch.Tensor:
    """The (B, C, h, w) samples of an image LATENT whose channels fit ``model``; refuses latents with a noise_mask
    (the refiner makes its own masks from the plan)."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise ValueError(f"'{name}' must be a LATENT (a dict with 'samples'), got {type(latent).__name__}.")
    samples = latent["samples"]
    if samples.is_nested or samples.ndim != 4:
        raise ValueError(f"'{name}' must be an image latent of shape (B, C, h, w), got {tuple(samples.shape)}: "
                         "video and audio latents are not supported.")
    if "noise_mask" in latent:
        raise ValueError(f"'{name}' already carries a noise_mask (SetLatentNoiseMask / VAEEncodeForInpaint): the "
                         "refiner masks stage 1 with the plan's mask. Encode the image with a plain VAEEncode.")
    check_model_channels(model, samples.shape[1], f"'{name}' has {samples.shape[1]} channels")
    return samples


def check_model_channels(model, channels: int, what: str) -> None:
    """Raise when a latent with ``channels`` channels cannot go into ``model`` (a VAE of another model family)."""
    expected = model.get_model_object("latent_format").latent_channels
    if channels != expected:
        raise ValueError(
            f"{what} but the model works on {expected}-channel latents: the VAE does not belong to this model "
            f"(e.g. an SDXL/SD1.5 VAE with an SD3/Flux model, or the reverse). Use the VAE made for the model."
        )


def check_conditioning(conditioning, name: str) -> list:
    """A CONDITIONING used for every image: each entry's batch must be 1."""
    entries_ok = isinstance(conditioning, list) and all(isinstance(c, (list, tuple)) and len(c) == 2 for c in conditioning)
    if not entries_ok:
        raise ValueError(f"'{name}' must be a CONDITIONING (from CLIPTextEncode), got {type(conditioning).__name__}.")
    for entry in conditioning:
        if isinstance(entry[0], torch.Tensor) and entry[0].shape[0] != 1:
            raise ValueError(
                f"'{name}' holds a batch of {entry[0].shape[0]} conditionings: the refiner uses one conditioning for "
                f"every image (each image's emphasized prompt is in the plan). Encode a single prompt."
            )
    return conditioning


def check_mask_mode(mask_mode: str) -> str:
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}.")
    return mask_mode


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int], pixels_per_latent: int,
                soft: bool = False) -> torch.Tensor:
    """A pixel mask (H, W) in [0, 1], 1 = change, reduced to the latent grid (h, w).

    Binary (default): float 0/1, 1 where any pixel of the cell is masked (> 0.5), so the latent mask covers every
    masked pixel. Soft: the largest value in the cell, in [0, 1], with values below ``SOFT_MASK_FLOOR`` set to 0.
    The pixels are centre-cropped to a multiple of ``pixels_per_latent`` first, as ComfyUI's VAE encode crops them."""
    height, width = mask.shape[-2:]
    h, w = latent_size
    f = pixels_per_latent
    if height // f != h or width // f != w:
        raise ValueError(
            f"The plan's mask is {height}x{width} pixels (H x W) but the latent is {h}x{w} cells, i.e. "
            f"{h * f}x{w * f} pixels at {f} pixels per latent cell: the plan was made from another image size. "
            f"Compute the maps on the same image you VAE-encode (or set pixels_per_latent to your VAE's factor)."
        )
    top, left = (height % f) // 2, (width % f) // 2
    cropped = mask[top:top + h * f, left:left + w * f].float()
    values = cropped.clamp(0, 1) if soft else (cropped > 0.5).float()
    # (h*f, w*f) -> (1, 1, h*f, w*f) -> max over each f x f cell -> (h, w)
    cells = F.max_pool2d(values[None, None], kernel_size=f)[0, 0]
    if soft:
        cells = torch.where(cells >= SOFT_MASK_FLOOR, cells, torch.zeros_like(cells))
    return cells


def stage_masks(plans: list[ImagePlan], latent_size: tuple[int, int], pixels_per_latent: int,
                mask_mode: str = "binary") -> torch.Tensor:
    """(B, 1, h, w) latent-grid stage-1 masks of every plan in [0, 1] (all-zero for images that skip stage 1):
    from the binary masks, or from the feathered ones in soft mode."""
    soft = check_mask_mode(mask_mode) == "soft"
    masks = [
        torch.zeros(latent_size) if plan.skip_stage1 else
        latent_mask(plan.feathered_mask if soft else plan.binary_mask, latent_size, pixels_per_latent, soft)
        for plan in plans
    ]
    return torch.stack(masks)[:, None]  # (B, h, w) -> (B, 1, h, w)


def stage_jobs(plans: list[ImagePlan], stage: int, masks: torch.Tensor | None = None) -> list[tuple[tuple, list[int]]]:
    """The sampler calls of one stage: ((strength, steps, prompt), image indices), images sharing all three
    grouped; images the stage does not run for (``stage_runs``, with the latent mask ``masks[index]`` in stage 1)
    left out."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, plan in enumerate(plans):
        mask = masks[index] if stage == 1 and masks is not None else None
        if not stage_runs(plan, stage, mask):
            continue
        strength, steps = (plan.stage1_strength, plan.stage1_steps) if stage == 1 else \
            (plan.stage2_strength, plan.stage2_steps)
        if not 0 <= strength <= 1:
            raise ValueError(f"Image {index}'s stage-{stage} strength is {strength}: it must be in [0, 1]. Rebuild "
                             "the plan with the Refine Plan node.")
        groups[(float(strength), int(steps), plan.prompt)].append(index)
    return list(groups.items())


def plan_conditioning(clip=None, positive=None, negative=None, negative_prompt: str = "") -> ConditioningFor:
    """prompt -> (positive, negative) CONDITIONING for :func:`run_stage`, shared by the stage nodes and G-Refine.

    With ``clip``, each plan's prompt (the eq. 7 emphasized prompt) is encoded as CLIPTextEncode would (ComfyUI parses
    the ``(phrase:1.1)`` emphasis), each distinct prompt once; ``negative_prompt`` likewise unless ``negative`` is
    connected. A connected ``positive`` overrides the plan's prompts (one conditioning for every image: the per-image
    emphasis is then not used). Refuses a setup that cannot condition: no clip and a missing positive or negative."""
    if clip is None and (positive is None or negative is None):
        missing = [name for name, value in (("positive", positive), ("negative", negative)) if value is None]
        raise ValueError(
            f"No CLIP and no {' or '.join(missing)} conditioning: connect a CLIP (the plan's emphasized prompt of each "
            f"image is then encoded with it), or both positive and negative conditionings."
        )
    cache: dict[str, list] = {}

    def encode(text: str) -> list:
        if text not in cache:
            cache[text] = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        return cache[text]

    fixed_positive = check_conditioning(positive, "positive") if positive is not None else None
    fixed_negative = check_conditioning(negative, "negative") if negative is not None else None
    if fixed_positive is not None and clip is not None:
        logger.info("positive conditioning connected: it overrides the plans' emphasized prompts")

    def conditioning_for(prompt: str) -> tuple[list, list]:
        return (fixed_positive if fixed_positive is not None else encode(prompt),
                fixed_negative if fixed_negative is not None else encode(negative_prompt))

    return conditioning_for


class StageProgress:
    """One ComfyUI progress bar over every sampler step of a node (both stages in the all-in-one node), with
    latent previews like KSampler's. Each update is also ComfyUI's interrupt point."""

    def __init__(self, total_steps: int):
        self.total = max(int(total_steps), 1)
        self.done = 0
        self.bar = comfy.utils.ProgressBar(self.total)

    def callback(self, model):
        previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        offset = self.done

        def on_step(step, x0, x, total_steps):
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
            self.bar.update_absolute(min(offset + step + 1, self.total), self.total, preview)

        return on_step

    def advance(self, steps: int) -> None:
        self.done += steps
        self.bar.update_absolute(min(self.done, self.total), self.total)


def sampled_images(plans: list[ImagePlan], masks: torch.Tensor) -> list[int]:
    """Indices of the images either stage samples (the others are returned untouched)."""
    stage1 = [i for _, indices in stage_jobs(plans, 1, masks) for i in indices]
    stage2 = [i for _, indices in stage_jobs(plans, 2) for i in indices]
    return sorted(set(stage1) | set(stage2))


def planned_steps(plans: list[ImagePlan], stage: int, masks: torch.Tensor | None = None) -> int:
    """How many sampler steps a stage will run (for the progress bar)."""
    return sum(key[1] for key, _ in stage_jobs(plans, stage, masks))


def with_differential_diffusion(model):
    """A clone of ``model`` patched with ComfyUI's Differential Diffusion denoise-mask function (strength 1), as the
    DifferentialDiffusion node makes it; ``model`` itself is not changed."""
    from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion

    patched = model.clone()
    patched.set_model_denoise_mask_function(
        lambda *args, **kwargs: DifferentialDiffusion.forward(*args, **kwargs, strength=1.0)
    )
    return patched


def run_stage(
    model,
    conditioning_for: ConditioningFor,
    samples: torch.Tensor,
    plans: list[ImagePlan],
    stage: int,
    seed: int,
    sampler_name: str,
    scheduler: str,
    cfg: float,
    progress: StageProgress,
    masks: torch.Tensor | None = None,
    batch_index=None,
    soft_mask: bool = False,
) -> torch.Tensor:
    """Re-denoise ``samples`` (B, C, h, w) by the plans' stage ``stage`` (1: masked, 2: global); returns a new
    (B, C, h, w) tensor, unsampled images unchanged. masks: (B, 1, h, w) latent-grid masks in [0, 1] (stage 1
    only); soft_mask: they are soft (``stage_masks`` in soft mode) and stage 1 samples with Differential Diffusion."""
    if stage == 1 and masks is None:
        raise ValueError("stage 1 needs the latent masks (stage_masks)")
    if stage == 1 and soft_mask:
        model = with_differential_diffusion(model)
    noise = comfy.sample.prepare_noise(samples, seed, batch_index)  # (B, C, h, w), image i as in a KSampler batch
    result = samples.clone()
    for (strength, steps, prompt), indices in stage_jobs(plans, stage, masks):
        comfy.model_management.throw_exception_if_processing_interrupted()
        positive, negative = conditioning_for(prompt)
        part = samples[indices]
        mask = masks[indices].to(part.device) if stage == 1 else None
        sampled = comfy.sample.sample(
            model, noise[indices], steps, cfg, sampler_name, scheduler, positive, negative, part,
            denoise=strength, noise_mask=mask, callback=progress.callback(model),
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
        ).to(device=part.device, dtype=part.dtype)
        if mask is not None:
            sampled = torch.where(mask > 0, sampled, part)  # (k, 1, h, w) over (k, C, h, w): input kept bit for bit
        result[indices] = sampled
        progress.advance(steps)
        logger.debug("stage %d: images %s, strength %.3f, %d steps", stage, indices, strength, steps)
    return result
