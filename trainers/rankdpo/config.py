"""Configuration of ``refinery-train-rankdpo``: one frozen dataclass, built and checked by :func:`parse_args`.

Defaults: beta 2500 (= Diffusion-DPO's beta_dpo 5000 in ``core/rankdpo.py``'s scale), LoRA rank 8 on the UNet's
attention projections, AdamW lr 1e-5 with 5 % warm-up and cosine decay, batch of 4 prompt groups.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from ...core.rankdpo import DEFAULT_BETA, DISCOUNT_RANKS
from ..common.config import (LoraTrainingOptions, TrainingConfig, add_lora_arguments, add_training_arguments,
                             lora_config_from_args)
from ..common.data import INDEX_FILE, dataset_file

LOSSES = ("rankdpo", "dpo")


@dataclass(frozen=True)
class RankDPOConfig(LoraTrainingOptions):
    """Everything one run depends on (written to ``training_config.json`` and the LoRA's metadata): the LoRA
    options (``common/config.LoraTrainingOptions``: model, family, resolution, rank, ...) and these.

    dataset: a Syn-Pic folder holding ``index.jsonl`` (``refinery-synpic``), or the ``.jsonl`` itself. loss:
    "rankdpo" (eq. 7 with DCG weights over all k images of a prompt) or "dpo" (pairwise Diffusion-DPO on the best
    and the worst image of each prompt: k = 2, Delta = 1). dcg_ranks: what the DCG discount ranks by, "model" (the
    current scores, sec. 3.3) or "labels" (phi, Algorithm 2). beta: > 0, in ``core/rankdpo.py``'s scale. Images
    are resized (shorter side) and centre-cropped to the resolution.
    """

    dataset: Path
    training: TrainingConfig
    loss: str = "rankdpo"
    dcg_ranks: str = "model"
    beta: float = DEFAULT_BETA
    output_name: str = field(default="rankdpo_lora", kw_only=True)


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
    add_lora_arguments(parser, data, resolution_help="training side in pixels", output_name="rankdpo_lora",
                       gradient_checkpointing=False, checkpointing_help="recompute UNet activations in the backward pass: less memory, about 30 %% "
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
    if not args.beta > 0 or args.beta == float("inf"):
        parser.error(f"--beta must be a positive finite number, got {args.beta} (Diffusion-DPO's range for SD1.5 / "
                     f"SDXL is 1000-2500 on this scale).")
    if not dataset_file(args.dataset, INDEX_FILE).is_file():
        parser.error(f"--dataset '{args.dataset}' is neither a .jsonl file nor a folder holding {INDEX_FILE} (make one "
                     f"with refinery-synpic).")
    return lora_config_from_args(RankDPOConfig, args, parser)
