"""Configuration of ``refinery-train-focus-n-fix``: one frozen dataclass, built and checked by :func:`parse_args`.

Defaults follow the paper where it says (focus-n-fix.txt sec. 4: DRaFT-K with K = 2, LoRA, region masks by
Gaussian smoothing with kernel 16 / sigma 4 at 512 px) and DRaFT's SD1.5 recipe where it does not (DDIM, 50
sampling steps, guidance 7.5, AdamW lr 1e-4, LoRA rank 8, gradient checkpointing on). beta has no scale-free default:
it weighs a Frobenius norm of pixel differences in [0, 1] against the reward's own units (see ``--beta``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from ...core.focus_n_fix import NORMALIZATIONS, RegionSettings
from ...core.rewards.loading import REWARD_KINDS
from ..common.config import (LoraTrainingOptions, TrainingConfig, add_lora_arguments, add_training_arguments,
                             lora_config_from_args)

REGIONS = ("saliency", "quality-maps", "full")
SCHEDULERS = ("ddim", "pipeline")


@dataclass(frozen=True)
class FocusNFixConfig(LoraTrainingOptions):
    """Everything one run depends on (written to ``training_config.json`` and the LoRA's metadata): the LoRA
    options (``common/config.LoraTrainingOptions``: model, family, resolution, rank, ...) and these.

    prompts: a .txt (one prompt per line) or .jsonl ({"prompt": ...}) file. reward / reward_kind: the
    differentiable reward r (a file or folder ``core/rewards`` loads). beta >= 0: weight of the regional constraint
    (0 = DRaFT). truncate_k: DRaFT-K's K, 1 <= K <= sampling_steps. region: "saliency" (|dr/dI| of
    ``region_reward`` or of r), "quality-maps" (G-Refine's 1 - P + A from ``quality_clip`` + ``quality_prompts``)
    or "full" (all ones: no constraint). region_settings: the mask post-processing. mask_samples: reference / mask /
    generated images saved per sample step.
    """

    prompts: Path
    reward: Path
    training: TrainingConfig
    reward_kind: str = "auto"
    beta: float = 1.0
    truncate_k: int = 2
    sampling_steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    eta: float = 0.0
    region: str = "saliency"
    region_reward: Path | None = None
    region_reward_kind: str = "auto"
    quality_clip: Path | None = None
    quality_architecture: str = "auto"
    quality_prompts: Path | None = None
    region_settings: RegionSettings = RegionSettings()
    mask_samples: int = 4
    gradient_checkpointing: bool = field(default=True, kw_only=True)
    output_name: str = field(default="focus_n_fix_lora", kw_only=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refinery-train-focus-n-fix",
        description="Fine-tune a LoRA on an SD1.5 / SDXL model with Focus-N-Fix (focus-n-fix.txt eq. 2): maximise a "
        "differentiable reward of the generated image (DRaFT-K: gradients through the last K sampling steps) while "
        "keeping it equal to the base model's image, from the same noise, outside the problematic regions M(I_0). "
        "--beta 0 is plain DRaFT-K. Writes <output-dir>/<output-name>.safetensors for ComfyUI's LoraLoader and "
        "diffusers' load_lora_weights, and masks/ (reference | mask | generated) to inspect the region function.",
        epilog="Multi-GPU: accelerate launch -m comfyui_refinery.trainers.focus_n_fix.train --prompts ... (or "
        "`accelerate launch $(which refinery-train-focus-n-fix) ...`).",
    )
    data = parser.add_argument_group("prompts, model and reward")
    data.add_argument("--prompts", type=Path, required=True,
                      help='prompts: a .txt (one per line; blank and "#" lines skipped) or .jsonl ({"prompt": ...})')
    data.add_argument("--reward", type=Path, required=True,
                      help="the differentiable reward r to maximise: a reward file or folder (CLIPScore, HPSv2, "
                      "PickScore, aesthetic head, or a refinery-train-preference output)")
    data.add_argument("--reward-kind", choices=("auto", *REWARD_KINDS), default="auto")
    method = parser.add_argument_group("method")
    method.add_argument("--beta", type=float, default=1.0,
                        help="weight of the regional constraint ||(1 - M) (I_0 - I)||_F (pixels in [0, 1], norm over "
                        "H x W x 3) against the reward's units; 0 = plain DRaFT-K. Pick it so that beta times a "
                        "typical norm (a few units at 512 px) is comparable to the reward gain you expect")
    method.add_argument("--truncate-k", type=int, default=2,
                        help="DRaFT-K: backpropagate through the last K sampling steps only (paper: 2)")
    method.add_argument("--sampling-steps", type=int, default=50, help="denoising steps per sample")
    method.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (1 = none)")
    method.add_argument("--scheduler", choices=SCHEDULERS, default="ddim",
                        help="ddim: DDIM from the model's scheduler config; pipeline: the model's own scheduler")
    method.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    region = parser.add_argument_group("region function M (no gradient)")
    region.add_argument("--region", choices=REGIONS, default="saliency",
                        help="saliency: |dr/dI| of --region-reward (default: --reward); quality-maps: G-Refine's "
                        "1 - P + A from --quality-clip; full: an all-ones mask (no constraint, DRaFT)")
    region.add_argument("--region-reward", type=Path, default=None,
                        help="a differentiable reward whose saliency gives M (default: --reward)")
    region.add_argument("--region-reward-kind", choices=("auto", *REWARD_KINDS), default="auto")
    region.add_argument("--quality-clip", type=Path, default=None,
                        help="open_clip checkpoint for the PQ/AQ maps (--region quality-maps)")
    region.add_argument("--quality-architecture", default="auto", help="open_clip architecture of --quality-clip")
    region.add_argument("--quality-prompts", type=Path, default=None,
                        help="PQ prompt embeddings (.safetensors from the prompt learner, or the Q-Refine folder); "
                        "default: the hand-written quality prompts")
    defaults = RegionSettings()
    region.add_argument("--mask-threshold", type=float, default=defaults.threshold,
                        help="pixels above this (a fraction of the peak for saliency) are problematic")
    region.add_argument("--mask-normalization", choices=NORMALIZATIONS, default=None,
                        help="peak: threshold relative to each map's maximum; none: absolute (default: peak for "
                        "saliency, none for quality-maps)")
    region.add_argument("--smoothing-kernel", type=int, default=defaults.smoothing_kernel,
                        help="Gaussian kernel size in pixels at 512 px (scaled with the resolution)")
    region.add_argument("--smoothing-sigma", type=float, default=defaults.smoothing_sigma,
                        help="Gaussian sigma in pixels at 512 px")
    region.add_argument("--max-regions", type=int, default=defaults.max_regions,
                        help="keep the N largest connected regions (0: all)")
    region.add_argument("--dilation", type=int, default=defaults.dilation, help="dilation radius in pixels at 512 px")
    region.add_argument("--mask-samples", type=int, default=4,
                        help="images saved to <output-dir>/masks/ at step 1 and at every checkpoint (0: none)")
    add_lora_arguments(parser, data, resolution_help="generation side in pixels", output_name="focus_n_fix_lora",
                       gradient_checkpointing=True, checkpointing_help="recompute UNet and VAE-decoder activations in "
                       "the backward pass (default on)", rank_help="LoRA rank r >= 1 (paper: 64)")
    add_training_arguments(parser, learning_rate=1e-4, weight_decay=1e-2, train_batch_size=2, max_train_steps=1000,
                           checkpointing_steps=100)
    return parser


def parse_args(input_args: list[str] | None = None) -> FocusNFixConfig:
    """Parse ``input_args`` (default ``sys.argv[1:]``) into a checked :class:`FocusNFixConfig`; a bad value exits
    with status 2 and a message naming the flag. The prompts' contents, the model's family, the reward's
    differentiability and the output folder are checked by the trainer before any long work."""
    parser = build_parser()
    args = parser.parse_args(input_args)
    if args.sampling_steps < 1:
        parser.error(f"--sampling-steps must be at least 1, got {args.sampling_steps}.")
    if not 1 <= args.truncate_k <= args.sampling_steps:
        parser.error(f"--truncate-k must be between 1 and --sampling-steps ({args.sampling_steps}), got "
                     f"{args.truncate_k}: DRaFT-K backpropagates through the last K of the sampling steps.")
    if not (args.beta >= 0 and args.beta != float("inf")):
        parser.error(f"--beta must be a finite number >= 0 (0 = plain DRaFT), got {args.beta}.")
    if not args.guidance_scale >= 1:
        parser.error(f"--guidance-scale must be >= 1 (1 = no classifier-free guidance), got {args.guidance_scale}.")
    if not 0 <= args.eta <= 1:
        parser.error(f"--eta must be in [0, 1], got {args.eta}.")
    if args.mask_samples < 0:
        parser.error(f"--mask-samples must be >= 0, got {args.mask_samples}.")
    for flag, path in (("--prompts", args.prompts), ("--reward", args.reward),
                       ("--region-reward", args.region_reward), ("--quality-clip", args.quality_clip),
                       ("--quality-prompts", args.quality_prompts)):
        if path is not None and not path.exists():
            parser.error(f"{flag} '{path}' does not exist.")
    if args.region == "quality-maps" and args.quality_clip is None:
        parser.error("--region quality-maps needs --quality-clip (the open_clip checkpoint of the PQ/AQ maps).")
    if args.region != "quality-maps" and (args.quality_clip or args.quality_prompts):
        parser.error("--quality-clip / --quality-prompts are only used with --region quality-maps.")
    if args.region != "saliency" and args.region_reward is not None:
        parser.error("--region-reward is only used with --region saliency.")
    normalization = args.mask_normalization or ("none" if args.region == "quality-maps" else "peak")
    try:
        region_settings = RegionSettings(smoothing_kernel=args.smoothing_kernel, smoothing_sigma=args.smoothing_sigma,
                                         normalization=normalization, threshold=args.mask_threshold,
                                         max_regions=args.max_regions, dilation=args.dilation)
    except ValueError as error:
        parser.error(f"bad mask option: {error}")
    return lora_config_from_args(FocusNFixConfig, args, parser, region_settings=region_settings)
