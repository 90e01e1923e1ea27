"""``refinery-train-preference``: fine-tune an open_clip CLIP into a preference (reward) model on preference pairs,
with Stable Preference (stable-preference.txt sec. 3; losses in ``core/stable_preference.py``) or plain
cross-entropy, and write it as a "reward-clip/1" safetensors file.

Score: ``S = logit_scale * cos(image, prompt)`` (the losses' scale); the saved file's score is the plain cosine,
which ranks images the same. Output in ``--output-dir``: ``<output-name>.safetensors`` (full CLIP state dict and
metadata), ``<output-name>.json`` (its open_clip model config, so ``load_quality_clip`` can read it with
architecture "auto"), ``training_config.json``, and ``checkpoints/step-<n>`` + ``checkpoints/latest``.

Example::

    refinery-train-preference --dataset data/train --checkpoint toy-clip.safetensors --output-dir runs/sp \
        --max-train-steps 3000 --train-batch-size 64 --learning-rate 2e-6 --trainable-image-layers 18 \
        --trainable-text-layers 8 --checkpointing-steps 500
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import torch

from ...core import stable_preference as sp
from ...core.clip_surgery import AUTO_ARCHITECTURE, load_quality_clip
from ..common.accelerate_setup import make_accelerator, seed_for_step
from ..common.atomic import atomic_write_json
from ..common.checkpoint import register_trainable_state_hooks, resume_point
from ..common.config import SetupError, config_to_dict, refuse_existing_output
from ..common.console import TrainingInterrupted, TrainingRun, run_console
from ..common.loop import Optimization, StepOutput, make_step_sampler, run_training_loop
from ..common.optim import make_optimizer, make_scheduler
from ...core.rewards.trained import save_trained_reward
from .config import StablePreferenceConfig, parse_args
from .data import PreferenceDataset, collate, read_pairs

logger = logging.getLogger(__name__)

PROG = "refinery-train-preference"
MAX_LOGIT_SCALE = math.log(100.0)  # open_clip's training clamp of the temperature
AUGMENTATION_STREAM = 1
__all__ = ["main", "run", "parse_args", "train", "load_reward_clip", "freeze_layers", "pair_scores", "batch_loss",
           "SetupError", "TrainingInterrupted"]


# ------------------------------------------------------------------------------------------------ model
def load_reward_clip(checkpoint: Path, architecture: str = AUTO_ARCHITECTURE):
    """Load an open_clip CLIP for training, offline. Returns ``(model, recorded_architecture, open_clip_config,
    tokenizer)``: the model in float32 train mode; the architecture name for the metadata ("" when the config came
    from a JSON beside the checkpoint rather than open_clip's own list)."""
    import open_clip

    try:
        encoder = load_quality_clip(checkpoint, architecture)
    except (FileNotFoundError, ValueError) as error:
        raise SetupError(f"Cannot load the CLIP checkpoint: {error}") from error
    config = open_clip.get_model_config(encoder.architecture)
    recorded = "" if architecture == AUTO_ARCHITECTURE else encoder.architecture
    return encoder.model.float().train(), recorded, config, encoder.tokenizer


def _set_trainable(item, flag: bool) -> None:
    if isinstance(item, torch.nn.Parameter):
        item.requires_grad_(flag)
    elif isinstance(item, torch.nn.Module):
        item.requires_grad_(flag)


def freeze_layers(model, image_layers: int | None, text_layers: int | None, train_logit_scale: bool) -> list[str]:
    """Freeze all but the last ``image_layers`` image / ``text_layers`` text transformer blocks (None: the whole
    tower trains, embeddings included); the output norms and projections of both towers always train, the logit
    scale when ``train_logit_scale``. Returns the names of the trainable parameters, in model order."""
    model.requires_grad_(False)
    visual = model.visual
    text = model.text if hasattr(model, "text") else model
    text_blocks = getattr(getattr(text, "transformer", None), "resblocks", None)
    image_blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if image_blocks is None or text_blocks is None:
        raise SetupError("Layer freezing needs open_clip's transformer towers (visual.transformer.resblocks and "
                         "transformer.resblocks); this model has another structure.")
    for tower, blocks, count, flag, head in (
        ("image", image_blocks, image_layers, "--trainable-image-layers", (visual.ln_post, visual.proj)),
        ("text", text_blocks, text_layers, "--trainable-text-layers", (text.ln_final, text.text_projection)),
    ):
        if count is not None and count > len(blocks):
            raise SetupError(f"{flag} {count} is more than the {len(blocks)} blocks of the {tower} tower; use at most "
                             f"{len(blocks)}, or -1 for all.")
        if count is None:
            if tower == "image":
                visual.requires_grad_(True)
            else:
                for item in (text.token_embedding, text.positional_embedding, text.transformer, *head):
                    _set_trainable(item, True)
            continue
        for block in list(blocks)[len(blocks) - count :]:
            block.requires_grad_(True)
        for item in head:
            _set_trainable(item, True)
    model.logit_scale.requires_grad_(train_logit_scale)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def input_size(model) -> tuple[int, int]:
    """(H, W) the image tower takes."""
    size = model.visual.image_size
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def normalisation(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (1, 3, 1, 1), of the tower's input normalisation (OpenAI's when the model names none)."""
    import open_clip

    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def pair_scores(model, tokens: torch.Tensor, pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Scores S (logit scale) of V views per prompt in one forward of the (possibly DDP-wrapped) model.

    tokens: (N, L) prompt tokens; pixels: (N, V, 3, H, W) in [0, 1] at the input size. Returns (N, V)."""
    count, views = pixels.shape[:2]
    images = (pixels.flatten(0, 1) - mean.to(pixels)) / std.to(pixels)  # (N * V, 3, H, W)
    output = model(image=images, text=tokens)
    if isinstance(output, dict):
        image_features, text_features, scale = output["image_features"], output["text_features"], output["logit_scale"]
    else:
        image_features, text_features, scale = output[:3]
    return sp.clip_scores(image_features.float().view(count, views, -1), text_features.float(), scale.float())


# ------------------------------------------------------------------------------------------------ loss
def batch_loss(config: StablePreferenceConfig, model, tokenizer, batch: dict, step: int, micro_index: int,
               mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured loss on one micro-batch at optimiser step ``step`` (0-based); the weak views are drawn from
    a generator seeded by (seed, micro_index). Returns (scalar loss, detached statistics)."""
    preferred, rejected = batch["preferred"], batch["rejected"]  # (B, 3, H, W) each
    pixels = torch.stack([preferred, rejected], dim=1)  # (B, 2, 3, H, W): view 0 preferred, view 1 rejected
    k = config.augmentations
    with_views = config.loss == "stable-preference" and config.anti_interference
    if with_views:
        generator = torch.Generator().manual_seed(seed_for_step(config.training.seed, micro_index, AUGMENTATION_STREAM))
        options = dict(scale=config.crop_scale, ratio=config.crop_ratio, flip_probability=config.flip_probability)
        pixels = torch.cat([pixels, sp.weak_augment(preferred, k, generator, **options),
                            sp.weak_augment(rejected, k, generator, **options)], dim=1)  # (B, 2 + 2k, 3, H, W)
    tokens = tokenizer(batch["prompts"]).to(device)
    scores = pair_scores(model, tokens, pixels.to(device), mean, std)  # (B, 2 [+ 2k])
    if config.loss == "cross-entropy":
        per_pair = sp.preference_loss(scores[:, 0], scores[:, 1])
        loss = per_pair.mean()
        stats = {"l_pref": float(per_pair.detach().mean()), "phase": 0.0}
    else:
        phase = sp.phase_for_step(step, config.training.max_train_steps, config.step_one_fraction)
        result = sp.stable_preference_loss(
            scores[:, 0], scores[:, 1],
            scores[:, 2 : 2 + k] if with_views else None,
            scores[:, 2 + k :] if with_views else None,
            phase, config.step_one_b, config.step_one_tau,
        )
        loss = result.loss
        stats = {"l_pref": float(result.preference.detach().mean()),
                 "l_ai": float(result.anti_interference.detach().mean()), "phase": float(phase)}
    margin = (scores[:, 0] - scores[:, 1]).detach()
    stats.update(loss=float(loss.detach()), accuracy=float((margin > 0).float().mean()), margin=float(margin.mean()))
    return loss, stats


# ------------------------------------------------------------------------------------------------ run
def train(config: StablePreferenceConfig) -> Path:
    """Run the training described by ``config`` (checks first: nothing is written before the dataset, the
    checkpoint and the output folder are known good). Returns the path of the saved reward. Ctrl-C raises
    :class:`TrainingInterrupted` (a KeyboardInterrupt) after saving a checkpoint (``common/console.py``)."""
    with TrainingRun(config.training.output_dir, config.training.max_train_steps) as training_run:
        return _train(config, training_run)


def _train(config: StablePreferenceConfig, training_run: TrainingRun) -> Path:
    training = config.training
    pairs = read_pairs(config.dataset)
    output = training.output_dir / f"{config.output_name}.safetensors"
    refuse_existing_output(output, config.overwrite)
    resume, resume_state = resume_point(training.output_dir, training.resume_from, training.max_train_steps)
    accelerator = make_accelerator(training)  # writes nothing; sets threads and seeds
    model, architecture, model_config, tokenizer = load_reward_clip(config.checkpoint, config.architecture)
    trainable = freeze_layers(model, config.trainable_image_layers, config.trainable_text_layers,
                              config.train_logit_scale)
    if resume is not None and resume_state.get("trainable", trainable) != trainable:
        raise SetupError(f"Checkpoint '{resume}' trained other parameters than these layer-freezing options select; "
                         f"resume with the options it was started with (see its {resume / 'trainer_state.json'}).")
    sampler = make_step_sampler(training, accelerator, len(pairs), "pairs")
    optimizer = make_optimizer(model, training)
    scheduler = make_scheduler(optimizer, training, accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    register_trainable_state_hooks(accelerator, unwrapped, trainable)
    config_dict = config_to_dict(config)
    logger.info("%d pairs, %d trainable parameter tensors (%d values), loss %s", len(pairs), len(trainable),
                sum(p.numel() for p in unwrapped.parameters() if p.requires_grad), config.loss)
    mean, std = (tensor.to(accelerator.device) for tensor in normalisation(unwrapped))

    def step_function(batch: dict, micro_index: int, step: int) -> StepOutput:
        return StepOutput(*batch_loss(config, model, tokenizer, batch, step, micro_index, mean, std,
                                      accelerator.device))

    def clamp_logit_scale(step: int, output: StepOutput) -> None:
        if config.train_logit_scale:
            with torch.no_grad():
                unwrapped.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def export(step: int) -> None:
        save_trained_reward(unwrapped, model_config, output, architecture, config_dict)
        atomic_write_json(output.with_suffix(".json"), model_config)
        logger.info("Saved the reward to %s", output)

    optimization = Optimization([model], optimizer, scheduler, [p for p in model.parameters() if p.requires_grad])
    run_training_loop(accelerator, training_run, training, optimization, step_function,
                      dataset=PreferenceDataset(pairs, input_size(model)), collate_fn=collate, sampler=sampler,
                      resume=resume, config_dict=config_dict, export=export, description=config.loss,
                      progress_stats={"loss": "loss", "acc": "accuracy"}, nan_advice="a lower --learning-rate",
                      checkpoint_extra={"trainable": trainable}, after_step=clamp_logit_scale)
    return output


def run(input_args: list[str] | None = None) -> Path:
    """Parse ``input_args`` (default ``sys.argv[1:]``) and train: the console command as a Python call. Returns the
    path of the reward; bad flags exit with status 2 (argparse), other problems raise their own errors."""
    return train(parse_args(input_args))


def main(input_args: list[str] | None = None) -> int:
    """Console entry point; returns the exit status. 0: the reward is written; 1: an unusable dataset, checkpoint or
    output folder (a message, before anything is written), or a NaN loss (with the step); 2: a bad flag; 130:
    Ctrl-C (a checkpoint is saved, and the command that resumes is printed)."""
    return run_console(PROG, __spec__.name if __spec__ else __name__, run, input_args)


if __name__ == "__main__":
    sys.exit(main())
