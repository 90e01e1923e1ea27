"""Configuration of ``refinery-train-rankdpo``: one frozen dataclass, built and checked by :func:`parse_args`.

Defaults: beta 2500 (= Diffusion-DPO's beta_dpo 5000 in ``core/rankdpo.py``'s scale), LoRA rank 8 on the UNet's
attention projections, AdamW lr 1e-5 with 5 % warm-up and cosine decay, batch of 4 prompt groups.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ...core.rankdpo import DEFAULT_BETA, DISCOUNT_RANKS
from ..common.config import (
    TrainingConfig,
    add_lora_arguments,
    add_training_arguments,
    check_lora_arguments,
    training_config_from_args,
)
from ..common.lora import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES

LOSSES = ("rankdpo", "dpo")
INDEX_FILE = "index.jsonl"
FAMILIES = ("auto", "sd15", "sdxl")


@dataclass(frozen=True)
class RankDPOConfig:
    """Everything one run depends on (written to ``training_config.json`` and the LoRA's metadata).

    dataset: a Syn-Pic folder holding ``index.jsonl`` (``refinery-synpic``), or the ``.jsonl`` itself.
    model: the base model, a diffusers folder or a single-file SD1.5/SDXL ``.safetensors``; family: "auto" or the
    family it must be. loss: "rankdpo" (eq. 7 with DCG weights over all k images of a prompt) or "dpo" (pairwise
    Diffusion-DPO on the best and the worst image of each prompt: k = 2, Delta = 1). dcg_ranks: what the DCG
    discount ranks by, "model" (the current scores, sec. 3.3) or "labels" (phi, Algorithm 2). beta: > 0, in
    ``core/rankdpo.py``'s scale. resolution: training side in pixels (None: the model's native size); images are
    resized (shorter side) and centre-cropped to it.
    """

    dataset: Path
    model: Path
    training: TrainingConfig
    family: str = "auto"
    loss: str = "rankdpo"
    dcg_ranks: str = "model"
    beta: float = DEFAULT_BETA
    resolution: int | None = None
    rank: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = UNET_TARGET_MODULES
    train_text_encoder: bool = False
    text_encoder_target_modules: tuple[str, ...] = TEXT_ENCODER_TARGET_MODULES
    gradient_checkpointing: bool = False
    output_name: str = "rankdpo_lora"
    overwrite: bool = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refinery-train-rankdpo",
        description="Fine-tune a LoRA on an SD1.5 / SDXL model with RankDPO (rankdpo.txt eq. 7: DCG-weighted ranking "
        "loss over the k images of each prompt) or pairwise Diffusion-DPO, from a Syn-Pic ranked dataset; writes "
        "<output-dir>/<output-name>.safetensors, which ComfyUI's LoraLoader and diffusers' load_lora_weights load.",
        epilog="Multi-GPU: accelerate launch -m comfyui_refinery.trainers.rankdpo.train --dataset ... (or "
        "`accelerate launch $(which refinery-train-rankdpo) ...`).",
    )
    data = parser.add_argument_group("data and model")
    data.add_argument("--dataset", type=Path, required=True,
                      help=f"Syn-Pic folder with {INDEX_FILE} (or the .jsonl itself): one JSON object per line, "
                      '{"prompt": str, "images": [>= 2 paths relative to the file], "win_rates": [one phi in [0, 1] '
                      'per image]} (other keys, e.g. "scores", are ignored)')
    data.add_argument("--model", type=Path, required=True,
                      help="base model: a diffusers folder, or a single-file SD1.5/SDXL .safetensors (ComfyUI's "
                      "models/checkpoints/)")
    data.add_argument("--family", choices=FAMILIES, default="auto", help="the model family it must be (auto: read it "
                      "from the weights)")
    data.add_argument("--resolution", type=int, default=None,
                      help="training side in pixels (default: the model's native size); a multiple of 8")
    method = parser.add_argument_group("method")
    method.add_argument("--loss", choices=LOSSES, default="rankdpo",
                        help="rankdpo: DCG-weighted ranking loss over all images of a prompt; dpo: pairwise "
                        "Diffusion-DPO on each prompt's best and worst image (the k = 2, Delta = 1 case)")
    method.add_argument("--dcg-ranks", choices=DISCOUNT_RANKS, default="model",
                        help="what the DCG discount of eq. 6 ranks the images by: model = the current model's scores "
                        "(sec. 3.3, Fig. 2; default), labels = the win rates (the paper's Algorithm 2)")
    method.add_argument("--beta", type=float, default=DEFAULT_BETA,
                        help="KL strength on core/rankdpo.py's scale: 0.5 x Diffusion-DPO's beta_dpo (its SD1.5 / "
                        "SDXL 5000 is 2500 here)")
    add_lora_arguments(parser, output_name="rankdpo_lora", gradient_checkpointing=False,
                       checkpointing_help="recompute UNet activations in the backward pass: less memory, about 30 %% "
                       "slower", text_encoder_help="also train a LoRA on the text encoder(s) (the reference disables "
                       "it too)")
    add_training_arguments(parser, learning_rate=1e-5, weight_decay=1e-2, train_batch_size=4,
                           max_train_steps=1000, checkpointing_steps=250)
    return parser


def parse_args(input_args: list[str] | None = None) -> RankDPOConfig:
    """Parse ``input_args`` (default ``sys.argv[1:]``) into a checked :class:`RankDPOConfig`; a bad value exits with
    status 2 and a message naming the flag. Checks the paths exist; the dataset's contents, the model's family and
    the output folder's state are checked by the trainer before any long work."""
    parser = build_parser()
    args = parser.parse_args(input_args)
    training = training_config_from_args(args, parser)
    check_lora_arguments(args, parser)
    if not args.beta > 0 or args.beta == float("inf"):
        parser.error(f"--beta must be a positive finite number, got {args.beta} (Diffusion-DPO's range for SD1.5 / "
                     f"SDXL is 1000-2500 on this scale).")
    if not (args.dataset.is_file() or (args.dataset / INDEX_FILE).is_file()):
        parser.error(f"--dataset '{args.dataset}' is neither a .jsonl file nor a folder holding {INDEX_FILE} (make one "
                     f"with refinery-synpic).")
    if not args.model.exists():
        parser.error(f"--model '{args.model}' does not exist: pass a diffusers folder or a single-file checkpoint.")
    return RankDPOConfig(
        dataset=args.dataset,
        model=args.model,
        training=training,
        family=args.family,
        loss=args.loss,
        dcg_ranks=args.dcg_ranks,
        beta=args.beta,
        resolution=args.resolution,
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=tuple(args.target_modules),
        train_text_encoder=args.train_text_encoder,
        text_encoder_target_modules=tuple(args.text_encoder_target_modules),
        gradient_checkpointing=args.gradient_checkpointing,
        output_name=args.output_name,
        overwrite=args.overwrite,
    )
