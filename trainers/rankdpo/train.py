"""``refinery-train-rankdpo``: train a LoRA on an SD1.5 / SDXL model with RankDPO (rankdpo.txt eq. 7) or pairwise
Diffusion-DPO from a Syn-Pic ranked dataset, and write it for ComfyUI (``core/lora_export.py``).

One step, per prompt group of k images (Algorithm 2): encode the images with the VAE; draw one timestep t and one
noise eps for the whole group; noise every image with them; predict with the UNet + LoRA (the policy) and with the
same UNet with its adapters disabled (the reference, no second UNet in memory, no gradient); per-image diffusion
scores ``s_i`` (eq. 5); the loss of ``core/rankdpo.py``. Every random draw of a micro-batch comes from a generator
seeded by (seed, micro-batch index), so a resumed run is exactly the uninterrupted one.

Output in ``--output-dir``: ``<output-name>.safetensors`` (kohya-format LoRA with true alphas and metadata),
``training_config.json``, ``checkpoints/step-<n>`` + ``checkpoints/latest``.

Example::

    refinery-synpic --prompts prompts.txt --model sd15.safetensors --seeds 4 --reward hps.pt --output-dir data/synpic
    refinery-train-rankdpo --dataset data/synpic --model sd15.safetensors --output-dir runs/rankdpo \
        --max-train-steps 400 --train-batch-size 8 --learning-rate 1e-5 --rank 16 --gradient-checkpointing
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ...core import rankdpo
from ..common import sd_models
from ..common.accelerate_setup import make_accelerator, seed_for_step
from ..common.checkpoint import resume_point
from ..common.config import config_to_dict
from ..common.console import TrainingInterrupted, TrainingRun, run_console
from ..common.lora import adapters_disabled
from ..common.loop import StepOutput, make_step_sampler, run_training_loop
from ..common.sd_models import SetupError, TrainingModels, encode_prompts, load_models
from ..common.sd_models import expand_conditioning as _expand
from .config import RankDPOConfig, parse_args
from .data import RankedGroupDataset, collate, read_groups

logger = logging.getLogger(__name__)

PROG = "refinery-train-rankdpo"
NOISE_STREAM = 2
METHOD_NAMES = {"rankdpo": "rankdpo", "dpo": "diffusion-dpo"}
WEIGHTING = {"rankdpo": "dcg", "dpo": "uniform"}
__all__ = ["main", "run", "parse_args", "train", "load_models", "noisy_batch", "policy_prediction",
           "reference_prediction", "batch_scores", "batch_loss", "TrainingModels", "NoisyBatch", "SetupError",
           "TrainingInterrupted"]


# ------------------------------------------------------------------------------------------------ loss
@dataclass
class NoisyBatch:
    """One micro-batch ready for the UNet: ``noisy`` (N, C, h, w) latents at ``timesteps`` (N,), the prediction
    ``target`` (eps, or v for v-prediction models), the conditioning per image, and ``group_index`` (N,) image -> its
    prompt group. N = sum of the group sizes."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    hidden: torch.Tensor
    added: dict | None
    group_index: torch.Tensor


def noisy_batch(models: TrainingModels, batch: dict, seed: int, micro_index: int, device: torch.device,
                weight_dtype: torch.dtype = torch.float32) -> NoisyBatch:
    """Encode a micro-batch (:func:`.data.collate` output) and noise it with one timestep and one noise per prompt
    group (Algorithm 2). The VAE sample, the timesteps and the noise come from a generator seeded by
    (seed, micro_index): the same call draws the same t and eps."""
    sizes = batch["group_sizes"]
    generator = torch.Generator().manual_seed(seed_for_step(seed, micro_index, NOISE_STREAM))
    pixels = batch["pixels"].to(device, weight_dtype)
    vae_config = models.vae.config
    with torch.no_grad():
        latents = models.vae.encode(pixels).latent_dist.sample(generator=generator)
        latents = (latents - (vae_config.get("shift_factor") or 0.0)) * vae_config.scaling_factor
    group_count = len(sizes)
    scheduler = models.noise_scheduler
    group_timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (group_count,), generator=generator)
    group_noise = torch.randn((group_count, *latents.shape[1:]), generator=generator)
    index = torch.repeat_interleave(torch.arange(group_count), torch.tensor(sizes))  # image -> its group
    noise = group_noise[index].to(device, latents.dtype)
    timesteps = group_timesteps[index].to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise SetupError(f"The scheduler's prediction type {prediction_type!r} is not supported (epsilon, "
                         f"v_prediction).")
    index = index.to(device)
    hidden, added = _expand(encode_prompts(models, batch["prompts"], device), index)
    return NoisyBatch(noisy, timesteps, target, hidden, added, index)


def policy_prediction(models: TrainingModels, noisy: NoisyBatch) -> torch.Tensor:
    """The UNet + LoRA prediction (differentiable in the LoRA): (N, C, h, w)."""
    return models.unet(noisy.noisy, noisy.timesteps, noisy.hidden, added_cond_kwargs=noisy.added).sample


@torch.no_grad()
def reference_prediction(models: TrainingModels, noisy: NoisyBatch, prompts: list[str]) -> torch.Tensor:
    """The reference prediction: the same UNet (and text encoders) with every adapter disabled, no gradient."""
    reference_models = [models.base_unet] + (models.base_text_encoders if models.trains_text_encoder else [])
    hidden, added = noisy.hidden, noisy.added
    with adapters_disabled(*reference_models):
        if models.trains_text_encoder:
            hidden, added = _expand(encode_prompts(models, prompts, noisy.noisy.device, reference=True),
                                    noisy.group_index)
        return models.base_unet(noisy.noisy, noisy.timesteps, hidden.detach(), added_cond_kwargs=None if added is None
                                else {key: value.detach() for key, value in added.items()}).sample


def batch_scores(models: TrainingModels, batch: dict, seed: int, micro_index: int, device: torch.device,
                 weight_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Eq. 5 diffusion scores of every image of a micro-batch: (sum k,) float32, differentiable in the LoRA.
    Calling this twice with the same (seed, micro_index) uses the same t and eps (:func:`noisy_batch`)."""
    noisy = noisy_batch(models, batch, seed, micro_index, device, weight_dtype)
    policy = policy_prediction(models, noisy)
    reference = reference_prediction(models, noisy, batch["prompts"])
    return rankdpo.diffusion_scores(rankdpo.denoising_errors(noisy.target, policy),
                                    rankdpo.denoising_errors(noisy.target, reference))


def batch_loss(config: RankDPOConfig, models: TrainingModels, batch: dict, micro_index: int, device: torch.device,
               weight_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured loss on one micro-batch: eq. 7 (or pairwise DPO) per group, averaged over the groups.
    Returns (scalar loss, detached statistics: loss, pair accuracy of the current scores, mean |s|)."""
    scores = batch_scores(models, batch, config.training.seed, micro_index, device, weight_dtype)
    group_scores = torch.split(scores, batch["group_sizes"])
    win_rates = [group_rates.to(device) for group_rates in batch["win_rates"]]
    loss = torch.stack([rankdpo.rankdpo_loss(scores_p, rates_p, config.beta, WEIGHTING[config.loss], config.dcg_ranks)
                        for scores_p, rates_p in zip(group_scores, win_rates)]).mean()
    stats = {"loss": float(loss.detach()), "accuracy": float(rankdpo.implicit_accuracy(group_scores, win_rates)),
             "score_scale": float(scores.detach().abs().mean())}
    return loss, stats


# ------------------------------------------------------------------------------------------------ run
def train(config: RankDPOConfig) -> Path:
    """Run the training described by ``config``. Dataset, output folder, checkpoint and model are checked first;
    nothing is written before they are known good. Returns the path of the LoRA. Ctrl-C raises
    :class:`TrainingInterrupted` (a KeyboardInterrupt) after saving a checkpoint (``common/console.py``)."""
    with TrainingRun(config.training.output_dir, config.training.max_train_steps) as training_run:
        return _train(config, training_run)


def _train(config: RankDPOConfig, training_run: TrainingRun) -> Path:
    training = config.training
    groups = read_groups(config.dataset)
    if config.loss == "dpo":
        groups = [group.best_and_worst() for group in groups]
    output = sd_models.check_output(config)
    resume, _ = resume_point(training.output_dir, training.resume_from, training.max_train_steps)
    accelerator = make_accelerator(training)
    models = load_models(config)
    sampler = make_step_sampler(training, accelerator, len(groups), "prompt groups")
    prepared = sd_models.prepare_lora_training(config, models, accelerator)
    config_dict = config_to_dict(config)
    logger.info("%d prompt groups (%d images), family %s, resolution %d, loss %s, beta %g, %d LoRA tensors",
                len(groups), sum(len(group.images) for group in groups), models.family, models.resolution,
                config.loss, config.beta, sum(len(module_names) for module_names in prepared.names))

    def step_function(batch: dict, micro_index: int, step: int) -> StepOutput:
        return StepOutput(*batch_loss(config, models, batch, micro_index, accelerator.device, prepared.weight_dtype))

    def export(step: int) -> None:
        sd_models.export_trained_lora(output, config, models, METHOD_NAMES[config.loss], config_dict,
                                      {"refinery.beta": config.beta, "refinery.resolution": models.resolution,
                                       "refinery.steps": step})
        logger.info("Saved the LoRA to %s", output)

    run_training_loop(accelerator, training_run, training, prepared, step_function,
                      dataset=RankedGroupDataset(groups, models.resolution), collate_fn=collate, sampler=sampler,
                      resume=resume, config_dict=config_dict, export=export, description=config.loss,
                      progress_stats={"loss": "loss", "acc": "accuracy"},
                      nan_advice="a lower --learning-rate or --beta")
    return output


def run(input_args: list[str] | None = None) -> Path:
    """Parse ``input_args`` (default ``sys.argv[1:]``) and train: the console command as a Python call. Returns the
    path of the LoRA; bad flags exit with status 2 (argparse), other problems raise their own errors."""
    return train(parse_args(input_args))


def main(input_args: list[str] | None = None) -> int:
    """Console entry point; returns the exit status. 0: the LoRA is written; 1: an unusable dataset, model,
    checkpoint or output folder (a message, before anything is written) or a loss that became NaN (the message names
    the step); 2: a bad flag; 130: Ctrl-C (a checkpoint is saved, and the command that resumes is printed)."""
    return run_console(PROG, __spec__.name if __spec__ else __name__, run, input_args)


if __name__ == "__main__":
    sys.exit(main())
