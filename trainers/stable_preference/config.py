"""Configuration of ``refinery-train-preference``: one frozen dataclass, built and checked by :func:`parse_args`.

Defaults follow stable-preference.txt sec. 4.2 where it gives them (AdamW, lr 2e-6, weight decay 0.2, cosine with
warm-up, k = 3 weak views with crop scale [0.85, 1], b = 0.3, tau = 0.2, step 1 for the first 10 % of steps).
The paper trains the last 18 image / 8 text blocks of CLIP-H; the defaults here train every block, because the
right count depends on the tower (``--trainable-image-layers 18 --trainable-text-layers 8`` for the paper's).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ...core import stable_preference as sp
from ..common.config import (
    TrainingConfig,
    add_training_arguments,
    config_from_args,
    training_config_from_args,
)
from ..common.data import dataset_file

LOSSES = ("stable-preference", "cross-entropy")
DATASET_FILE = "pairs.jsonl"


@dataclass(frozen=True)
class StablePreferenceConfig:
    """Everything one training run depends on (written to ``training_config.json`` and the model's metadata).

    dataset: a folder holding ``pairs.jsonl``, or a ``.jsonl`` file. checkpoint: the open_clip CLIP to start from;
    architecture: an open_clip model name, or "auto" to read ``<checkpoint stem>.json`` beside it.
    loss: "stable-preference" (eq. 7 then eq. 8, with L_ai unless anti_interference is False) or "cross-entropy"
    (plain L_pref, eq. 2; the augmentation and two-step options are then unused).
    trainable_image_layers / trainable_text_layers: how many of the last transformer blocks of each tower train
    (None: all); the projections, final norms and (unless train_logit_scale is False) the logit scale always train.
    """

    dataset: Path
    checkpoint: Path
    training: TrainingConfig
    architecture: str = "auto"
    output_name: str = "reward"
    overwrite: bool = False
    loss: str = "stable-preference"
    augmentations: int = sp.AUGMENTATIONS
    crop_scale: tuple[float, float] = sp.CROP_SCALE
    crop_ratio: tuple[float, float] = sp.CROP_RATIO
    flip_probability: float = 0.5
    anti_interference: bool = True
    step_one_fraction: float = sp.STEP_ONE_FRACTION
    step_one_b: float = sp.STEP_ONE_B
    step_one_tau: float = sp.STEP_ONE_TAU
    trainable_image_layers: int | None = None
    trainable_text_layers: int | None = None
    train_logit_scale: bool = True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refinery-train-preference",
        description="Train a CLIP preference (reward) model on preference pairs with Stable Preference "
        "(two-step loss + anti-interference loss) or plain cross-entropy; writes <output-dir>/<output-name>."
        "safetensors (format reward-clip/1).",
    )
    model = parser.add_argument_group("data and model")
    model.add_argument("--dataset", type=Path, required=True,
                       help=f"folder with {DATASET_FILE} (or the .jsonl itself); one JSON object per line, either "
                       '{"prompt", "preferred", "rejected"} or {"prompt", "image_0", "image_1", "label"} with label '
                       "the index (0 or 1) of the preferred image; image paths relative to the file")
    model.add_argument("--checkpoint", type=Path, required=True,
                       help="open_clip CLIP weights (.safetensors, or a torch state dict) to start from")
    model.add_argument("--architecture", default="auto",
                       help="open_clip model name, or 'auto' to read the model config <checkpoint stem>.json beside it")
    model.add_argument("--output-name", default="reward", help="file name (no extension) of the trained reward")
    model.add_argument("--overwrite", action="store_true", help="replace an existing <output-name>.safetensors")
    method = parser.add_argument_group("method")
    method.add_argument("--loss", choices=LOSSES, default="stable-preference",
                        help="stable-preference: eq. 7 for the first --step-one-fraction of steps, then eq. 8, each "
                        "on L_pref + L_ai; cross-entropy: plain L_pref (eq. 2), the usual baseline")
    method.add_argument("--augmentations", type=int, default=sp.AUGMENTATIONS,
                        help="k weak views per image for L_ai (stable-preference only; more = slower: 2 + 2k image "
                        "forwards per pair)")
    method.add_argument("--crop-scale", type=float, nargs=2, default=sp.CROP_SCALE, metavar=("LOW", "HIGH"),
                        help="area fraction range of the weak random resized crop")
    method.add_argument("--crop-ratio", type=float, nargs=2, default=sp.CROP_RATIO, metavar=("LOW", "HIGH"),
                        help="aspect-ratio range of the weak random resized crop")
    method.add_argument("--flip-probability", type=float, default=0.5, help="horizontal-flip chance of a weak view")
    method.add_argument("--no-anti-interference", dest="anti_interference", action="store_false",
                        help="leave L_ai out (Table 2 ablation): the two-step loss on L_pref alone")
    method.add_argument("--step-one-fraction", type=float, default=sp.STEP_ONE_FRACTION,
                        help="fraction of the steps trained with eq. 7 (order correction) before eq. 8")
    method.add_argument("--step-one-b", type=float, default=sp.STEP_ONE_B,
                        help="b of eq. 7, in logit units: margin at which a pair's weight is 0.5")
    method.add_argument("--step-one-tau", type=float, default=sp.STEP_ONE_TAU,
                        help="tau of eq. 7: width of the weight's fall-off (smaller = sharper)")
    freezing = parser.add_argument_group("layer freezing")
    freezing.add_argument("--trainable-image-layers", type=int, default=-1,
                          help="train only the last N image transformer blocks (-1: all; paper: 18 of CLIP-H's 32)")
    freezing.add_argument("--trainable-text-layers", type=int, default=-1,
                          help="train only the last M text transformer blocks (-1: all; paper: 8 of CLIP-H's 24)")
    freezing.add_argument("--freeze-logit-scale", dest="train_logit_scale", action="store_false",
                          help="keep the CLIP temperature fixed (scores are logit_scale * cosine)")
    add_training_arguments(parser)
    return parser


def parse_args(input_args: list[str] | None = None) -> StablePreferenceConfig:
    """Parse ``input_args`` (default ``sys.argv[1:]``) into a checked :class:`StablePreferenceConfig`; a bad value
    exits with status 2 and a message naming the flag."""
    parser = build_parser()
    args = parser.parse_args(input_args)
    training = training_config_from_args(args, parser)
    if not args.checkpoint.is_file():
        parser.error(f"--checkpoint '{args.checkpoint}' does not exist.")
    if not dataset_file(args.dataset, DATASET_FILE).is_file():
        parser.error(f"--dataset '{args.dataset}' is neither a .jsonl file nor a folder holding {DATASET_FILE}.")
    if not args.output_name or any(sep in args.output_name for sep in ("/", "\\")) or args.output_name.startswith("."):
        parser.error(f"--output-name must be a plain file name without folders, got {args.output_name!r}.")
    low, high = args.crop_scale
    if not 0 < low <= high <= 1:
        parser.error(f"--crop-scale needs 0 < LOW <= HIGH <= 1, got {low} {high}.")
    if not 0 < args.crop_ratio[0] <= args.crop_ratio[1]:
        parser.error(f"--crop-ratio needs 0 < LOW <= HIGH, got {args.crop_ratio[0]} {args.crop_ratio[1]}.")
    if not 0 <= args.flip_probability <= 1:
        parser.error(f"--flip-probability must be in [0, 1], got {args.flip_probability}.")
    if args.augmentations < 0:
        parser.error(f"--augmentations must not be negative, got {args.augmentations}.")
    if args.loss == "stable-preference" and args.anti_interference and args.augmentations == 0:
        parser.error("The anti-interference loss needs --augmentations >= 1; or pass --no-anti-interference.")
    if not 0 <= args.step_one_fraction <= 1:
        parser.error(f"--step-one-fraction must be in [0, 1], got {args.step_one_fraction}.")
    if args.step_one_tau <= 0:
        parser.error(f"--step-one-tau must be positive, got {args.step_one_tau}.")
    for flag in ("trainable_image_layers", "trainable_text_layers"):
        if getattr(args, flag) < -1:
            parser.error(f"--{flag.replace('_', '-')} must be -1 (all) or a block count >= 0, got {getattr(args, flag)}.")
    return config_from_args(
        StablePreferenceConfig, args, training=training,
        trainable_image_layers=None if args.trainable_image_layers == -1 else args.trainable_image_layers,
        trainable_text_layers=None if args.trainable_text_layers == -1 else args.trainable_text_layers,
    )
