"""``refinery-train-focus-n-fix``: train a LoRA on an SD1.5 / SDXL model with Focus-N-Fix (focus-n-fix.txt eq. 2,
Algorithm 1) or plain DRaFT-K (``--beta 0``), and write it for ComfyUI (``core/lora_export.py``).

One step, for a batch of prompts (Algorithm 1): draw x_T; sample the reference image I_0 with the LoRA disabled
(theta_0: the same UNet, no second copy, no gradient); the region function gives the mask M(I_0) (no gradient); sample
I_hat from the same x_T with the LoRA enabled, the first N - K denoising steps under ``no_grad`` and the last K with
gradients (DRaFT-K, gradient checkpointing on the UNet and the VAE decoder); decode; maximise
``J = r(I_hat, c) - beta * ||(1 - M(I_0)) (.) (I_0 - I_hat)||_F`` (``core/focus_n_fix.py``). Every random draw comes
from a generator seeded by (seed, micro-batch index), so a resumed run is exactly the uninterrupted one.

Output in ``--output-dir``: ``<output-name>.safetensors`` (kohya-format LoRA with true alphas and metadata),
``training_config.json``, ``masks/step-<n>.png`` (reference | mask over it | generated, to check the region
function), ``checkpoints/step-<n>`` + ``checkpoints/latest``.

Example::

    refinery-train-focus-n-fix --prompts prompts.txt --model sd15.safetensors --reward hps_v2.1.pt \
        --output-dir runs/fnf --beta 0.5 --truncate-k 2 --sampling-steps 50 --max-train-steps 500
"""

from __future__ import annotations

import inspect
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ...core import focus_n_fix
from ...core.focus_n_fix import NotDifferentiableError
from ...core.visualize import heatmap_overlay
from ..common import sd_models
from ..common.accelerate_setup import make_accelerator, seed_for_step
from ..common.checkpoint import resume_point
from ..common.config import config_to_dict
from ..common.console import TrainingInterrupted, TrainingRun, run_console
from ..common.data import read_prompts, save_png
from ..common.lora import adapters_disabled, set_gradient_checkpointing
from ..common.loop import StepOutput, make_step_sampler, run_training_loop
from ..common.sd_models import SetupError, TrainingModels, encode_prompts, load_models
from .config import FocusNFixConfig, parse_args

logger = logging.getLogger(__name__)

PROG = "refinery-train-focus-n-fix"
NOISE_STREAM = 3
Reward = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
__all__ = ["main", "run", "parse_args", "train", "training_step", "sample_latents", "decode_images", "StepResult",
           "load_reward", "make_region_function", "SetupError", "TrainingInterrupted"]


# ------------------------------------------------------------------------------------------------ rewards, regions
def load_reward(path: Path, kind: str, device: torch.device):
    """A frozen reward model from a local file (``core/rewards``) on ``device``; SetupError naming the file."""
    from ...core.rewards.loading import load_reward_model

    try:
        reward = load_reward_model(path, kind)
    except (OSError, ValueError) as error:
        raise SetupError(f"Cannot load the reward '{path}': {error}") from error
    return reward.to(device).eval().requires_grad_(False)


def reward_function(reward) -> Reward:
    """``(images (B, H, W, 3) in [0, 1], prompts) -> (B,)`` with the autograd graph kept."""
    return lambda images, prompts: reward.score(images, prompts, differentiable=True)


class QualityMapRegions:
    """Region heatmap (a): G-Refine's defect map ``1 - P + A`` of the reference images (PQ-Map with the given
    quality prompts, AQ-Map against each prompt; ``core/quality_maps.py``), from one quality-model forward."""

    def __init__(self, encoder, quality_prompts=None):
        from ...core import pq_map

        self.encoder = encoder
        prompts = quality_prompts if quality_prompts is not None else pq_map.text_quality_prompts()
        with torch.no_grad():
            self.prompt_features = pq_map.encode_quality_prompts(encoder, prompts)  # (4, 2, D), encoded once

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from ...core.quality_maps import compute_quality_maps

        maps = compute_quality_maps(self.encoder, images.float(), quality_prompts=self.prompt_features,
                                    prompt=list(prompts))
        return focus_n_fix.quality_map_heatmap(maps.perceptual_map, maps.alignment_map)


def make_region_function(config: FocusNFixConfig, reward, device: torch.device) -> Callable:
    """The heatmap source of ``config.region`` (``(images, prompts) -> (B, H, W) >= 0``, no gradient)."""
    if config.region == "full":
        return lambda images, prompts: torch.ones(images.shape[:3], device=images.device)
    if config.region == "quality-maps":
        from ...core import pq_map
        from ...core.clip_surgery import load_quality_clip

        try:
            encoder = load_quality_clip(config.quality_clip, config.quality_architecture, device=device)
            prompts = pq_map.load_prompt_embeddings(config.quality_prompts) if config.quality_prompts else None
        except (OSError, ValueError, KeyError) as error:
            raise SetupError(f"Cannot load the quality maps' model: {error}") from error
        return QualityMapRegions(encoder, prompts)
    region_reward = reward
    if config.region_reward is not None:
        region_reward = load_reward(config.region_reward, config.region_reward_kind, device)
    score = reward_function(region_reward) if hasattr(region_reward, "score") else region_reward
    return lambda images, prompts: focus_n_fix.saliency_heatmap(score, images, prompts)


# ------------------------------------------------------------------------------------------------ sampling
def make_sampling_scheduler(models: TrainingModels, config: FocusNFixConfig):
    """A fresh scheduler with ``config.sampling_steps`` timesteps set: DDIM from the model's scheduler config, or the
    model's own scheduler class (``--scheduler pipeline``)."""
    import diffusers

    if config.scheduler == "ddim":
        scheduler_class = diffusers.DDIMScheduler
    else:
        name = models.sampling_scheduler_config.get("_class_name", "DDIMScheduler")
        scheduler_class = getattr(diffusers, name, None)
        if scheduler_class is None:
            raise SetupError(f"The model's scheduler {name!r} is not in diffusers; use --scheduler ddim.")
    scheduler = scheduler_class.from_config(models.sampling_scheduler_config)
    scheduler.set_timesteps(config.sampling_steps)
    return scheduler


def prompt_conditioning(models: TrainingModels, prompts: list[str], device: torch.device, guidance_scale: float,
                        reference: bool = False):
    """UNet conditioning for classifier-free guidance: ``(hidden (2B or B, 77, D), added or None)``, the
    unconditional half first (empty prompt; zeros for SDXL models with ``force_zeros_for_empty_prompt``)."""
    hidden, added = encode_prompts(models, prompts, device, reference=reference)
    if guidance_scale <= 1:
        return hidden, added
    if models.force_zeros_for_empty_prompt:
        empty_hidden = torch.zeros_like(hidden)
        empty_added = None if added is None else {"text_embeds": torch.zeros_like(added["text_embeds"]),
                                                  "time_ids": added["time_ids"]}
    else:
        empty_hidden, empty_added = encode_prompts(models, [""] * len(prompts), device, reference=reference)
    hidden = torch.cat([empty_hidden, hidden])
    if added is not None:
        added = {key: torch.cat([empty_added[key], added[key]]) for key in added}
    return hidden, added


def sample_latents(unet: torch.nn.Module, scheduler, initial_noise: torch.Tensor, conditioning, guidance_scale: float,
                   truncate_k: int, eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoise ``initial_noise`` x_T (B, C, h, w) with ``scheduler``'s timesteps; the last ``truncate_k`` steps keep
    the autograd graph (DRaFT-K), the earlier ones run under ``no_grad`` (0: no gradient at all). Returns the
    clean latents (B, C, h, w). ``generator`` seeds the scheduler's own noise (DDIM with eta > 0)."""
    hidden, added = conditioning
    guided = guidance_scale > 1
    step_parameters = inspect.signature(scheduler.step).parameters
    extra = {}
    if "eta" in step_parameters:
        extra["eta"] = eta
    if "generator" in step_parameters:
        extra["generator"] = generator
    latents = initial_noise * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    first_differentiable = len(timesteps) - truncate_k
    for index, timestep in enumerate(timesteps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and index >= first_differentiable):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, timestep)
            prediction = unet(model_input, timestep, hidden, added_cond_kwargs=added).sample
            if guided:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = scheduler.step(prediction, timestep, latents, **extra).prev_sample
    return latents


def decode_images(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) -> images (B, H, W, 3) float32 in [0, 1] (differentiable in the latents)."""
    config = vae.config
    latents = latents / config.scaling_factor + (config.get("shift_factor") or 0.0)
    image = vae.decode(latents.to(next(vae.parameters()).dtype)).sample  # (B, 3, H, W) in [-1, 1]
    return (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------------ one step
@dataclass
class StepResult:
    """One step's loss (scalar, to minimise = -mean J) and what it was made of: reference I_0, generated I_hat
    (B, H, W, 3) in [0, 1], mask M(I_0) (B, H, W) 0/1, mask states, and detached statistics."""

    loss: torch.Tensor
    reference: torch.Tensor
    generated: torch.Tensor
    mask: torch.Tensor
    mask_states: list[str]
    stats: dict[str, float]


def training_step(config: FocusNFixConfig, models: TrainingModels, reward: Reward, region_function: Callable,
                  prompts: list[str], micro_index: int, device: torch.device,
                  weight_dtype: torch.dtype = torch.float32) -> StepResult:
    """Algorithm 1, lines 6-11, for one micro-batch of prompts (the caller backpropagates ``loss``)."""
    count = len(prompts)
    generator = torch.Generator().manual_seed(seed_for_step(config.training.seed, micro_index, NOISE_STREAM))
    unet_config = models.base_unet.config
    side = models.resolution // (2 ** (len(models.vae.config.block_out_channels) - 1))
    initial_noise = torch.randn((count, unet_config.in_channels, side, side), generator=generator)
    initial_noise = initial_noise.to(device, weight_dtype)
    scheduler_seed = seed_for_step(config.training.seed, micro_index, NOISE_STREAM + 1)

    reference_models = [models.base_unet] + (models.base_text_encoders if models.trains_text_encoder else [])
    with torch.no_grad(), adapters_disabled(*reference_models):
        reference_conditioning = prompt_conditioning(models, prompts, device, config.guidance_scale,
                                                     reference=models.trains_text_encoder)
        reference_latents = sample_latents(models.base_unet, make_sampling_scheduler(models, config), initial_noise,
                                           reference_conditioning, config.guidance_scale, 0, config.eta,
                                           torch.Generator().manual_seed(scheduler_seed))
        reference = decode_images(models.vae, reference_latents)
    if config.beta > 0 or config.mask_samples:
        mask, states = focus_n_fix.region_mask(region_function(reference, prompts), config.region_settings)
    else:
        mask, states = torch.ones(reference.shape[:3], device=device), ["full"] * count

    if models.trains_text_encoder:
        conditioning = prompt_conditioning(models, prompts, device, config.guidance_scale)
    else:
        conditioning = reference_conditioning  # the frozen text encoders give the same conditioning
    latents = sample_latents(models.unet, make_sampling_scheduler(models, config), initial_noise, conditioning,
                             config.guidance_scale, config.truncate_k, config.eta,
                             torch.Generator().manual_seed(scheduler_seed))
    generated = decode_images(models.vae, latents)
    rewards = reward(generated, prompts).float()
    constraint = focus_n_fix.regional_constraint(reference, generated, mask)
    loss = -focus_n_fix.objective(rewards, constraint, config.beta).mean()
    stats = {"loss": float(loss.detach()), "reward": float(rewards.detach().mean()),
             "constraint": float(constraint.detach().mean()), "mask_fraction": float(mask.mean()),
             "empty_masks": float(states.count("empty")), "full_masks": float(states.count("full"))}
    return StepResult(loss, reference.detach(), generated.detach(), mask, states, stats)


# ------------------------------------------------------------------------------------------------ outputs
def save_mask_samples(result: StepResult, folder: Path, step: int, count: int) -> Path:
    """``folder/step-<n>.png``: one row per image, reference | mask over the reference | generated; written
    atomically."""
    rows = []
    for index in range(min(count, result.reference.shape[0])):
        reference = result.reference[index : index + 1].cpu()
        overlay = heatmap_overlay(reference, result.mask[index : index + 1].cpu().float(), opacity=0.5)
        rows.append(torch.cat([reference[0], overlay[0], result.generated[index].cpu()], dim=1))  # (H, 3W, 3)
    return save_png(torch.cat(rows, dim=0), folder / f"step-{step:06d}.png")


def _warn_masks(states: list[str], step: int, warned: set[str]) -> None:
    explanations = {
        "empty": "the region function found nothing problematic, so the constraint covers the whole image (it is "
                 "kept like the base model's as far as --beta allows)",
        "full": "the mask covers the whole image, so there is no constraint on it (plain DRaFT for that image)",
    }
    for state, explanation in explanations.items():
        if state in states and state not in warned:
            warned.add(state)
            logger.warning("Step %d: %d of %d masks are %s: %s. Training continues; further %s masks are counted in "
                           "the log (lower/raise --mask-threshold if this is frequent).", step, states.count(state),
                           len(states), state, explanation, state)


# ------------------------------------------------------------------------------------------------ run
def train(config: FocusNFixConfig, reward=None, region_function: Callable | None = None) -> Path:
    """Run the training described by ``config``. Prompts, output folder, checkpoint, model and reward are checked
    first; nothing is written before they are known good. Returns the path of the LoRA.

    reward: a reward object (``.score(images, prompts, differentiable=True)`` and ``.name``) to use instead of
    loading ``config.reward`` (Python API, e.g. the toy-world benchmark). region_function: ``(images (B, H, W, 3),
    prompts) -> heatmap (B, H, W) >= 0`` instead of ``config.region``'s. Ctrl-C raises :class:`TrainingInterrupted`
    (a KeyboardInterrupt) after saving a checkpoint (``common/console.py``).
    """
    with TrainingRun(config.training.output_dir, config.training.max_train_steps) as training_run:
        return _train(config, reward, region_function, training_run)


def _train(config: FocusNFixConfig, reward, region_function: Callable | None, training_run: TrainingRun) -> Path:
    training = config.training
    prompts = read_prompts(config.prompts)
    output = sd_models.check_output(config)
    resume, _ = resume_point(training.output_dir, training.resume_from, training.max_train_steps)
    accelerator = make_accelerator(training)
    device = accelerator.device
    if reward is None:
        reward = load_reward(config.reward, config.reward_kind, device)
    reward_name = getattr(reward, "name", type(reward).__name__)
    score = reward_function(reward) if hasattr(reward, "score") else reward
    focus_n_fix.check_differentiable(score, reward_name, device=device)
    if region_function is None:
        region_function = make_region_function(config, reward, device)
    models = load_models(config)
    if config.gradient_checkpointing:
        set_gradient_checkpointing(models.vae, True)
    sampler = make_step_sampler(training, accelerator, len(prompts), "prompts")
    prepared = sd_models.prepare_lora_training(config, models, accelerator)
    config_dict = config_to_dict(config) | {"reward_name": reward_name}
    logger.info("%d prompts, family %s, resolution %d, reward %s, beta %g, K %d of %d steps, region %s",
                len(prompts), models.family, models.resolution, reward_name, config.beta, config.truncate_k,
                config.sampling_steps, config.region)
    warned: set[str] = set()

    def step_function(batch_prompts: list[str], micro_index: int, step: int) -> StepOutput:
        result = training_step(config, models, score, region_function, batch_prompts, micro_index, device,
                               prepared.weight_dtype)
        if config.beta > 0:
            _warn_masks(result.mask_states, step + 1, warned)
        return StepOutput(result.loss, result.stats, result)

    def save_masks(step: int, output: StepOutput) -> None:
        if accelerator.is_main_process and config.mask_samples and (
                step == 1 or step % training.checkpointing_steps == 0):
            save_mask_samples(output.details, training.output_dir / "masks", step, config.mask_samples)

    def export(step: int) -> None:
        metadata = {"refinery.beta": config.beta, "refinery.truncate_k": config.truncate_k,
                    "refinery.reward": reward_name, "refinery.resolution": models.resolution, "refinery.steps": step}
        sd_models.export_trained_lora(output, config, models, "focus-n-fix" if config.beta else "draft-k",
                                      config_dict, metadata)
        logger.info("Saved the LoRA to %s", output)

    run_training_loop(accelerator, training_run, training, prepared, step_function, dataset=prompts, collate_fn=list,
                      sampler=sampler, resume=resume, config_dict=config_dict, export=export,
                      description="focus-n-fix" if config.beta else "draft",
                      progress_stats={"reward": "reward", "constraint": "constraint"},
                      nan_advice="a lower --learning-rate, or a fixed reward", after_step=save_masks)
    return output


def run(input_args: list[str] | None = None) -> Path:
    """Parse ``input_args`` (default ``sys.argv[1:]``) and train: the console command as a Python call. Returns the
    path of the LoRA; bad flags exit with status 2 (argparse), other problems raise their own errors."""
    return train(parse_args(input_args))


def main(input_args: list[str] | None = None) -> int:
    """Console entry point; returns the exit status. 0: the LoRA is written; 1: unusable prompts, model, reward,
    checkpoint or output folder (a message, before anything is written), or a NaN loss (with the step); 2: a bad
    flag; 130: Ctrl-C (a checkpoint is saved, and the command that resumes is printed)."""
    return run_console(PROG, __spec__.name if __spec__ else __name__, run, input_args, (NotDifferentiableError,))


if __name__ == "__main__":
    sys.exit(main())
