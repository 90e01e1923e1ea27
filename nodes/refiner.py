"""G-Refine two-stage refiner nodes (g-refine.txt eq. 9-10, METHODS.md 1.4): thin V3 adapters over
``core.refine_plan`` and the ComfyUI sampling helpers of ``nodes/sampling.py``.

- Refine Plan: maps + scores -> REFINERY_PLAN (per image: binary/feathered mask, stage strengths and steps, skips).
- Masked Re-denoise (stage 1) and Global Re-denoise (stage 2): run a plan on a LATENT with any ComfyUI MODEL.
- G-Refine: the whole refiner in one node (maps, plan, both stages, decode).

Score lists: the PQ/AQ-Map nodes give p, a and the emphasized prompts as ComfyUI output lists (one value per
image). Wired into an ordinary input, ComfyUI would run the plan once per value; the plan node is therefore
``is_input_list=True``: it takes the whole lists (and unwraps its one-value widgets), so the same sockets also take a
single typed-in value that applies to every image.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from comfy_api.latest import io

import comfy.samplers

from ..core.detailer import DetailerSettings
from ..core.keep_better import GuardScores, GuardSettings, attempt_seed
from ..core.masks import MaskSettings
from ..core.refine_plan import (
    DEFAULT_MASK,
    ImagePlan,
    RefinerSettings,
    plan_refinement,
    stage_runs,
)
from .comfy_io import check_images, check_mask, match_batches, pad_to_multiple
from .detailer import (
    AUTO_RESOLUTION,
    detail_small_regions,
    native_resolution,
    plan_detailer,
)
from .keep_better import DEFAULT_GUARD, MAX_ATTEMPTS, guard_knobs, guard_scores, guarded
from .quality_maps import QualityClip, QualityPrompts, compute_quality_maps
from .sampling import (
    DEFAULT_PIXELS_PER_LATENT,
    MASK_MODES,
    StageProgress,
    check_latent,
    check_model_channels,
    check_plans,
    plan_conditioning,
    planned_steps,
    run_stage,
    sampled_images,
    stage_masks,
)
from .scoring import score_batch

logger = logging.getLogger(__name__)

CATEGORY = "Refinery/refine"
Plan = io.Custom("REFINERY_PLAN")
SEED_MAX = 0xFFFFFFFFFFFFFFFF
DEFAULTS = RefinerSettings()


# -- shared schema pieces ------------------------------------------------------------------------------------------
def _plan_knobs() -> list:
    """Mask and plan knobs shared by Refine Plan and G-Refine (names are RefinerSettings/MaskSettings fields)."""
    return [
        io.Float.Input("threshold", default=DEFAULT_MASK.threshold, min=0.0, max=1.0, step=0.01,
                       tooltip="Pixels where 1-P+A is above it are re-denoised in stage 1. Lower = larger mask."),
        io.Int.Input("min_area", default=DEFAULT_MASK.min_area, min=0, max=1 << 24,
                     tooltip="Mask regions smaller than this many pixels are dropped (speckle removal)."),
        io.Int.Input("dilation", default=DEFAULT_MASK.dilation, min=0, max=512,
                     tooltip="Grow the mask by this many pixels so fixes blend into their surroundings."),
        io.Float.Input("feather", default=DEFAULT_MASK.feather_sigma, min=0.0, max=256.0, step=0.5,
                       tooltip="Gaussian sigma (pixels) of the feathered mask's soft edge (an output for blending, "
                       "and stage 1's mask when mask_mode is soft)."),
        io.Float.Input("strength_min", default=0.3, min=0.0, max=1.0, step=0.01,
                       tooltip="Stage-1 denoise of a perfect image (p = a = 1). Stage 1 strength = strength_max - "
                       "(strength_max - strength_min) * (p + a) / 2: lower quality, stronger."),
        io.Float.Input("strength_max", default=0.8, min=0.0, max=1.0, step=0.01,
                       tooltip="Stage-1 denoise of the worst image (p = a = 0). Higher = more repainting."),
        io.Float.Input("global_strength", default=0.1, min=0.0, max=1.0, step=0.01,
                       tooltip="Stage-2 denoise of the whole image (delta, 0.1-0.15 in the paper). 0 = no stage 2."),
        io.Int.Input("total_steps", default=20, min=1, max=10000,
                     tooltip="Sampler steps of both stages together (n1 + n2; 20 in the paper). A total of 1 gives "
                     "stage 2 no step."),
        io.Float.Input("stage1_share", default=0.5, min=0.0, max=1.0, step=0.05,
                       tooltip="Fraction of total_steps run by stage 1 (each stage gets at least 1 when possible)."),
        io.Float.Input("perceptual_gate", default=DEFAULTS.perceptual_gate, min=0.0, max=1.01, step=0.01,
                       tooltip="An image with p >= perceptual_gate and a >= alignment_gate is good enough: no stage "
                       "1. Above 1 = never gate. Lower = more images skip stage 1."),
        io.Float.Input("alignment_gate", default=DEFAULTS.alignment_gate, min=-1.0, max=1.01, step=0.01,
                       tooltip="Gate on a, the AQ-Map's alignment probability in [0, 1] (0.5 = the prompt fits the "
                       "image no better than an empty prompt). Above 1 = never gate. An image whose prompt has nothing "
                       "to align (empty or no noun) is gated on p alone."),
        io.Boolean.Input("gated_untouched", default=DEFAULTS.skip_stage2_when_gated,
                         tooltip="On: images that pass both gates also skip stage 2 and come back bit-identical. Off "
                         "(default, as in the paper): they skip stage 1 and still get the light stage 2."),
    ]


def _settings(threshold: float, min_area: int, dilation: int, feather: float, strength_min: float,
              strength_max: float, global_strength: float, total_steps: int, stage1_share: float,
              perceptual_gate: float, alignment_gate: float, gated_untouched: bool) -> RefinerSettings:
    """The widget values as core settings (which validate them with a ValueError naming the knob)."""
    return RefinerSettings(
        strength_min=strength_min, strength_max=strength_max, global_strength=global_strength,
        total_steps=total_steps, stage1_share=stage1_share, perceptual_gate=perceptual_gate,
        alignment_gate=alignment_gate, skip_stage2_when_gated=gated_untouched,
        mask=MaskSettings(threshold=threshold, min_area=min_area, dilation=dilation, feather_sigma=feather),
    )


def _sampling_inputs() -> list:
    return [
        io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                     tooltip="Noise seed; image i of the batch gets the noise KSampler would give it."),
        io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                       tooltip="ComfyUI sampler, as in KSampler (euler is a good default for few steps)."),
        io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                       tooltip="ComfyUI scheduler; with strength d and n steps, the last n steps of an n/d schedule "
                       "run (as in KSampler with denoise)."),
        io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale. Higher = closer to the prompt."),
    ]


def _prompt_inputs() -> list:
    """The stage nodes' prompt sockets: the plan's per-image emphasized prompts through a CLIP, or one conditioning."""
    return [
        io.Clip.Input("clip", optional=True,
                      tooltip="Encodes each image's plan prompt (the AQ-Map's emphasized prompt, eq. 7) as "
                      "CLIPTextEncode would. Used when positive is not connected."),
        io.Conditioning.Input("positive", optional=True,
                              tooltip="One conditioning for every image; overrides the plan's per-image emphasized "
                              "prompts. Leave it unconnected and connect clip to use them."),
    ]


def _mask_mode_input() -> io.Combo.Input:
    return io.Combo.Input(
        "mask_mode", options=list(MASK_MODES), default="binary", optional=True,
        tooltip="binary: stage 1 re-denoises the binary mask at full strength and nothing else. soft: the feathered "
        "mask with ComfyUI's Differential Diffusion, so the change fades out across the soft edge (cells with mask m "
        "are re-denoised in the last m-fraction of the steps). Outside the (soft) mask the latent is kept bit for bit "
        "either way.")


def plan_summary(plans: list[ImagePlan], perceptual_scores, alignment_scores) -> str:
    """One readable line per image: the decision, scores, strengths, steps, mask area, prompt."""
    lines = []
    for index, plan in enumerate(plans):
        head = f"image {index}: {plan.reason} (p {float(perceptual_scores[index]):.3f}, " \
               f"a {float(alignment_scores[index]):.3f})"
        first_runs, second_runs = stage_runs(plan, 1), stage_runs(plan, 2)
        if not (first_runs or second_runs):
            lines.append(f"{head} | untouched")
            continue
        area = 100.0 * float(plan.binary_mask.float().mean())
        first = "stage 1: skipped" if not first_runs else \
            f"stage 1: strength {plan.stage1_strength:.3f}, {plan.stage1_steps} steps on {area:.1f}% of the pixels"
        second = "stage 2: skipped" if not second_runs else \
            f"stage 2: strength {plan.stage2_strength:.3f}, {plan.stage2_steps} steps"
        lines.append(f"{head} | {first} | {second} | prompt: {plan.prompt!r}")
    return "\n".join(lines)


def stage1_pixel_masks(plans: list[ImagePlan], kind: str = "binary_mask") -> torch.Tensor:
    """(B, H, W) masks (the plans' ``binary_mask`` or ``feathered_mask``) of what stage 1 re-denoises: all-zero
    where stage 1 is skipped."""
    return torch.stack([getattr(plan, kind) * (0.0 if plan.skip_stage1 else 1.0) for plan in plans])


def _one(values: list, name: str):
    """The single value of a widget on an is_input_list node."""
    if len(values) != 1:
        raise ValueError(f"'{name}' got {len(values)} values; it takes one value for the whole batch.")
    return values[0]


def _per_image(values: list, batch: int, name: str) -> list:
    """A list input with one value per image, or one value for all."""
    if len(values) == 1:
        return list(values) * batch
    if len(values) != batch:
        raise ValueError(f"'{name}' has {len(values)} values for a batch of {batch} images: connect the output of "
                         f"the map node that saw the same images (one value per image), or give a single value.")
    return list(values)


def _mask_batch(masks: list, name: str) -> torch.Tensor:
    """A MASK list input (usually one (B, H, W) batch) as one (B, H, W) tensor."""
    checked = [check_mask(mask, name) for mask in masks]
    if len({tuple(mask.shape[1:]) for mask in checked}) != 1:
        raise ValueError(f"'{name}' got masks of different sizes {[tuple(m.shape) for m in checked]}: resize them.")
    return torch.cat(checked)


# -- nodes ---------------------------------------------------------------------------------------------------------
class RefinePlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefineryRefinePlan",
            display_name="G-Refine Plan (Refinery)",
            category=CATEGORY,
            description="Decides, per image, what the two-stage refiner does: the stage-1 mask Bi(1-P+A), stage-1 "
            "strength from the scores p and a (lower quality, stronger), the steps of each stage, and whether the "
            "image passes the quality gate (no stage 1; with gated_untouched, no stage 2 either). Takes the per-image "
            "score lists of the map nodes as they are.",
            is_input_list=True,
            is_experimental=True,
            inputs=[
                io.Mask.Input("perceptual_map", tooltip="P from the PQ-Map node (1 = good)."),
                io.Float.Input("perceptual_score", default=0.5, min=0.0, max=1.0, step=0.001,
                               tooltip="p per image: connect the PQ-Map node's score list, or type one value for "
                               "every image. Lower = stronger stage 1."),
                io.Mask.Input("alignment_map", tooltip="A from the AQ-Map node (1 = must change)."),
                io.Float.Input("alignment_score", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="a per image, a probability in [0, 1]: connect the AQ-Map node's score list, or "
                               "one value for all. 1 with an empty or noun-less prompt (the defaults) = no alignment "
                               "term: the stage-1 strength follows p alone."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The prompt for both stages: connect the AQ-Map node's emphasized prompts "
                                "(one per image) or type one. Only carried in the plan and its summary."),
                *_plan_knobs(),
            ],
            outputs=[
                Plan.Output("plan", tooltip="Per-image plan for the re-denoise nodes."),
                io.Mask.Output("binary_mask", tooltip="Stage-1 mask, 1 = re-denoise (all-zero for gated images)."),
                io.Mask.Output("feathered_mask", tooltip="The mask with a soft edge, for blending."),
                io.String.Output("summary", tooltip="One line per image: decision, strengths, steps, mask area."),
            ],
        )

    @classmethod
    def execute(cls, perceptual_map: list, perceptual_score: list, alignment_map: list, alignment_score: list,
                prompt: list, **knobs: list) -> io.NodeOutput:
        settings = _settings(**{name: _one(value, name) for name, value in knobs.items()})
        perceptual, alignment = match_batches(_mask_batch(perceptual_map, "perceptual_map"),
                                              _mask_batch(alignment_map, "alignment_map"),
                                              ("perceptual_map", "alignment_map"))
        batch = perceptual.shape[0]
        p = torch.tensor(_per_image(perceptual_score, batch, "perceptual_score"), dtype=torch.float32)
        a = torch.tensor(_per_image(alignment_score, batch, "alignment_score"), dtype=torch.float32)
        prompts = _per_image(prompt, batch, "prompt")
        plans = plan_refinement(perceptual, p, alignment, a, prompts, settings)
        summary = plan_summary(plans, p, a)
        binary = stage1_pixel_masks(plans)
        feathered = stage1_pixel_masks(plans, "feathered_mask")
        return io.NodeOutput(plans, binary, feathered, summary, ui={"text": [summary]})


class MaskedRedenoise(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefineryMaskedRedenoise",
            display_name="G-Refine Stage 1: Masked Re-denoise (Refinery)",
            category=CATEGORY,
            description="Stage 1 of G-Refine: each image is re-denoised inside its plan mask only, at its own "
            "strength, with ComfyUI's sampler (a latent noise mask, so inpainting checkpoints work too). The latent "
            "outside the mask is returned bit-identical; images the plan skips (gated, empty mask) pass unchanged. An "
            "all-one mask re-denoises the whole image at the stage-1 strength; an all-zero mask skips the image.",
            is_experimental=True,
            inputs=[
                io.Model.Input("model", tooltip="Any ComfyUI model (an inpainting checkpoint suits stage 1)."),
                *_prompt_inputs(),
                io.Conditioning.Input("negative", tooltip="Negative conditioning for every image (e.g. "
                                      "CLIPTextEncode of an empty prompt, or what to avoid)."),
                io.Latent.Input("latent", tooltip="VAEEncode of the images the plan was made from."),
                Plan.Input("plan", tooltip="From the G-Refine Plan node."),
                *_sampling_inputs(),
                io.Int.Input("pixels_per_latent", default=DEFAULT_PIXELS_PER_LATENT, min=1, max=64,
                             tooltip="The VAE's downscale factor (8 for SD1.5, SDXL, SD3, Flux): maps the plan's "
                             "pixel masks onto the latent grid."),
                _mask_mode_input(),
            ],
            outputs=[io.Latent.Output("refined_latent")],
        )

    @classmethod
    def execute(cls, model, negative, latent: dict, plan: list, seed: int, sampler_name: str, scheduler: str,
                cfg: float, pixels_per_latent: int, mask_mode: str = "binary", positive=None,
                clip=None) -> io.NodeOutput:
        samples = check_latent(latent, model)
        plans = check_plans(plan, samples.shape[0])
        conditioning_for = plan_conditioning(clip, positive, negative)
        masks = stage_masks(plans, tuple(samples.shape[-2:]), pixels_per_latent, mask_mode)
        progress = StageProgress(planned_steps(plans, 1, masks))
        refined = run_stage(model, conditioning_for, samples, plans, 1, seed, sampler_name, scheduler,
                            cfg, progress, masks, latent.get("batch_index"), soft_mask=mask_mode == "soft")
        return io.NodeOutput({**latent, "samples": refined})


class GlobalRedenoise(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefineryGlobalRedenoise",
            display_name="G-Refine Stage 2: Global Re-denoise (Refinery)",
            category=CATEGORY,
            description="Stage 2 of G-Refine: the whole image re-denoised at the plan's small strength (delta) to "
            "even out stage 1's seams. Images the plan returns untouched pass bit-identical.",
            is_experimental=True,
            inputs=[
                io.Model.Input("model", tooltip="Any ComfyUI model; usually the base model (stage 2 lightly "
                               "re-denoises the whole image, no inpainting needed)."),
                *_prompt_inputs(),
                io.Conditioning.Input("negative", tooltip="Negative conditioning for every image (e.g. "
                                      "CLIPTextEncode of an empty prompt, or what to avoid)."),
                io.Latent.Input("latent", tooltip="Usually the Masked Re-denoise output."),
                Plan.Input("plan", tooltip="The plan stage 1 ran (from the G-Refine Plan node): its stage-2 "
                           "strengths and steps, and which images stay untouched."),
                *_sampling_inputs(),
            ],
            outputs=[io.Latent.Output("refined_latent")],
        )

    @classmethod
    def execute(cls, model, negative, latent: dict, plan: list, seed: int, sampler_name: str, scheduler: str,
                cfg: float, positive=None, clip=None) -> io.NodeOutput:
        samples = check_latent(latent, model)
        plans = check_plans(plan, samples.shape[0])
        conditioning_for = plan_conditioning(clip, positive, negative)
        progress = StageProgress(planned_steps(plans, 2))
        refined = run_stage(model, conditioning_for, samples, plans, 2, seed, sampler_name, scheduler,
                            cfg, progress, None, latent.get("batch_index"))
        return io.NodeOutput({**latent, "samples": refined})


class GRefine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefineryGRefine",
            display_name="G-Refine (Refinery)",
            category=CATEGORY,
            description="The whole G-Refine refiner: quality maps (PQ-Map, AQ-Map at their default knobs), plan, "
            "stage 1 (masked re-denoise, emphasized prompt) and stage 2 (light global re-denoise) with ComfyUI's "
            "sampler, decode. Images that pass the quality gate skip stage 1 and get only the light stage 2 (with "
            "gated_untouched on they come back bit-identical). Any picture size works: pictures whose sides are not "
            "multiples of the VAE factor (8) are padded (mirrored, or the edge repeated on sides too small to "
            "mirror) for sampling and cropped back, so every output has the picture's own size. Stage 1 samples with "
            "seed, stage 2 with seed + 1. The keep-better guard (on by default) scores each refined picture again "
            "and returns the input bit-identical unless the refinement scored better.",
            is_experimental=True,
            inputs=[
                io.Model.Input("model", tooltip="The model of stage 2 (and of stage 1 unless stage1_model is set)."),
                io.Clip.Input("clip", tooltip="Encodes the (emphasized) prompts, with ComfyUI's (text:1.1) syntax."),
                io.Vae.Input("vae", tooltip="The model's VAE."),
                io.Image.Input("image", tooltip="A batch of any size; sides that are not multiples of the VAE "
                               "factor are padded for sampling and cropped back (the outputs have the picture's "
                               "size)."),
                QualityClip.Input("quality_clip", tooltip="From Load Quality CLIP."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The generation prompt: checked by the AQ-Map; missing phrases are emphasized "
                                "per image for both stages."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt (unless a negative CONDITIONING is connected)."),
                *_sampling_inputs(),
                io.Float.Input("emphasis", default=1.1, min=1.0, max=2.0, step=0.05,
                               tooltip="Weight of the phrases the AQ-Map found missing, (phrase:1.1)."),
                *_plan_knobs(),
                _mask_mode_input(),
                QualityPrompts.Input("quality_prompts", optional=True,
                                     tooltip="Learned quality prompts; unconnected = the plain-text pairs."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Overrides the prompt (and the per-image emphasis) for sampling."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="A negative CONDITIONING; when connected it replaces negative_prompt."),
                io.Model.Input("stage1_model", optional=True,
                               tooltip="Another model for stage 1, e.g. an inpainting checkpoint of the same family."),
                *guard_knobs(with_switch=True),
                io.Float.Input("detailer_max_region", default=0.0, min=0.0, max=1.0, step=0.005, optional=True,
                               tooltip="Detailer mode: a stage-1 region whose bounding box covers less than this share "
                               "of the picture (e.g. 0.05) is cropped with context, upscaled to the model's native "
                               "resolution, re-denoised there and pasted back; larger regions are re-denoised in "
                               "place. 0 = off. Each small region costs one sampling at native resolution."),
                io.Int.Input("detailer_resolution", default=AUTO_RESOLUTION, min=0, max=4096, step=8, optional=True,
                             tooltip="The crop's longer side after upscaling. 0 = the model's native size (512 for "
                             "SD1.x/SD2, 1024 for SDXL-class models)."),
            ],
            outputs=[
                io.Image.Output("refined_image", tooltip="The pictures at their own size; with keep_better on, a "
                                "picture that did not score better is the input bit-identical."),
                io.Mask.Output("binary_mask", tooltip="Stage-1 mask per image (all-zero where stage 1 was skipped)."),
                io.String.Output("summary", tooltip="The plan, one line per image."),
                Plan.Output("plan", tooltip="Per-image plan (masks at the picture's size), e.g. for the re-denoise "
                            "nodes."),
                io.Float.Output("gain", tooltip="Per picture, the keep-better guard's gain of the attempt reported "
                                "(0 with the guard off); the summary holds the guard's table.", is_output_list=True),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, quality_clip, prompt: str, negative_prompt: str, seed: int,
                sampler_name: str, scheduler: str, cfg: float, emphasis: float, mask_mode: str = "binary",
                quality_prompts=None, positive=None, negative=None, stage1_model=None, keep_better: bool = True,
                attempts: int = 1, margin: float = DEFAULT_GUARD.margin, tolerance: float = DEFAULT_GUARD.tolerance,
                reward_weight: float = DEFAULT_GUARD.reward_weight, reward=None, detailer_max_region: float = 0.0,
                detailer_resolution: int = AUTO_RESOLUTION, **knobs) -> io.NodeOutput:
        settings = _settings(**knobs)
        guard = GuardSettings(margin=margin, tolerance=tolerance, reward_weight=reward_weight)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= MAX_ATTEMPTS:
            raise ValueError(f"attempts must be a whole number from 1 to {MAX_ATTEMPTS}, got {attempts!r}.")
        images = check_images(image)
        height, width = images.shape[1], images.shape[2]
        factor = vae.spacial_compression_encode()
        stage1_model = stage1_model if stage1_model is not None else model
        for name, each in (("model", model), ("stage1_model", stage1_model)):
            check_model_channels(each, vae.latent_channels, f"The VAE makes {vae.latent_channels}-channel latents "
                                 f"('{name}')")
        conditioning_for = plan_conditioning(clip, positive, negative, negative_prompt)

        # maps and plans on the picture itself; sampling on it padded to the VAE factor (cropped back after)
        maps = compute_quality_maps(quality_clip, images, quality_prompts=quality_prompts, prompt=prompt,
                                    emphasis=emphasis, progress=False)  # the sampling stages own the progress bar
        perceptual, p = maps.perceptual_map, maps.perceptual_score
        alignment, a, emphasized = maps.alignment_map, maps.alignment_score, maps.emphasized_prompts
        plans = plan_refinement(perceptual, p, alignment, a, emphasized, settings)
        summary = plan_summary(plans, p, a)

        detailer = None
        if detailer_max_region > 0:
            detailer = plan_detailer(plans, DetailerSettings(
                max_region_fraction=detailer_max_region, multiple=factor,
                native_resolution=native_resolution(stage1_model, detailer_resolution)))
            summary = "\n".join([summary] + [f"image {index}: detailer: {len(crops)} small region(s) re-denoised in "
                                             f"crops" for index, crops in enumerate(detailer.crops) if crops])
        inplace_plans = detailer.inplace_plans if detailer is not None else plans
        padded_plans = [_padded_plan(plan, factor) for plan in inplace_plans]  # masks (H, W) -> (H', W')
        latent_size = (-(-height // factor), -(-width // factor))
        masks = stage_masks(padded_plans, latent_size, factor, mask_mode)
        sampled = sampled_images(padded_plans, masks)
        runs = attempts if keep_better else 1
        crop_steps = detailer.steps(plans) if detailer is not None else 0
        progress = StageProgress(runs * (crop_steps + planned_steps(padded_plans, 1, masks)
                                         + planned_steps(padded_plans, 2)))

        def refine_once(attempt: int) -> torch.Tensor:
            """One pass: the detailer's crops, then both stages in place (images nothing is sampled for keep their
            exact pixels)."""
            stage1_seed = attempt_seed(seed, attempt, SEED_MAX)
            pictures = images
            if detailer is not None:
                pictures = detail_small_regions(stage1_model, vae, conditioning_for, images, plans, detailer,
                                                stage1_seed, sampler_name, scheduler, cfg, progress)
            refined = pictures.clone()
            if sampled:
                padded = pad_to_multiple(pictures, factor)  # (B, H, W, 3) -> (B, H', W', 3)
                samples = vae.encode(padded)  # (B, H', W', 3) -> (B, C, H'/8, W'/8)
                stage1 = run_stage(stage1_model, conditioning_for, samples, padded_plans, 1, stage1_seed,
                                   sampler_name, scheduler, cfg, progress, masks, soft_mask=mask_mode == "soft")
                stage2 = run_stage(model, conditioning_for, stage1, padded_plans, 2, (stage1_seed + 1) % (SEED_MAX + 1),
                                   sampler_name, scheduler, cfg, progress)
                decoded = vae.decode(stage2[sampled])  # (k, C, h, w) -> (k, H', W', 3)
                decoded = decoded.reshape(len(sampled), *padded.shape[1:])[:, :height, :width]  # crop the padding
                refined[sampled] = decoded.to(refined)
            return refined

        attempts_made = [refine_once(attempt) for attempt in range(runs)]
        gains, table = [0.0] * images.shape[0], ""
        if keep_better:
            before = GuardScores(p, a, None if reward is None else
                                 score_batch(reward, images, [prompt] * images.shape[0], progress=False))
            refined, decision, table = guarded(
                images, attempts_made, before,
                lambda pictures: guard_scores(quality_clip, pictures, prompt, quality_prompts, reward, emphasis),
                guard)
            gains = decision.gain.tolist()
            summary = f"{summary}\n\nkeep-better guard:\n{table}"
        else:
            refined = attempts_made[0]
        binary = stage1_pixel_masks(plans)
        return io.NodeOutput(refined, binary, summary, plans, gains, ui={"text": [summary]})


# -- G-Refine helpers (compositions of core calls, no method logic) ---------------------------------------------
def _padded_plan(plan: ImagePlan, factor: int) -> ImagePlan:
    """The plan with its (H, W) masks padded like the picture (:func:`.comfy_io.pad_to_multiple`), so the masks
    map onto the latent of the padded picture cell for cell."""
    return dataclasses.replace(plan, binary_mask=pad_to_multiple(plan.binary_mask[None], factor)[0],
                               feathered_mask=pad_to_multiple(plan.feathered_mask[None], factor)[0])


NODES = [RefinePlan, MaskedRedenoise, GlobalRedenoise, GRefine]
