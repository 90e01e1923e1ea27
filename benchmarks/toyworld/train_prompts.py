"""Learn the toy world's PQ-Map quality prompts for toy-clip with the project's prompt learner.

The same code (core/prompt_learner.py) learns prompts for real towers; here the labels are the toy world's:
per factor, 1 = the picture has no defect of that factor (overall: no perceptual defect at all). The per-factor
cask bounds alpha are then set as G-Refine/Q-Refine set theirs: the mean L_raw of each defect factor over the
training pictures. Writes models/toy-quality-prompts.safetensors (alpha in its metadata) and a metrics JSON.

Run: python -m comfyui_refinery.benchmarks.toyworld.train_prompts [--images 4000] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ...core import pq_map
from ...core.clip_surgery import ImageFeatures, SurgeryCLIP, load_quality_clip
from ...core.prompt_learner import train_quality_prompts
from . import data


def encode_in_batches(
    encoder: SurgeryCLIP, images: torch.Tensor, batch_size: int = 256, use_surgery: bool = True
) -> ImageFeatures:
    """One forward per batch of (N, H, W, 3) pictures, concatenated (use_surgery=False: plain patch tokens)."""
    parts = [
        encoder.encode_image(images[start : start + batch_size], use_surgery=use_surgery)
        for start in range(0, len(images), batch_size)
    ]
    return ImageFeatures(
        torch.cat([part.cls_embedding for part in parts]),
        torch.cat([part.patch_features for part in parts]),
        parts[0].image_size,
    )


def calibrated_alpha(encoder: SurgeryCLIP, features: ImageFeatures, prompts: pq_map.QualityPrompts) -> list[float]:
    """Mean CLS L_raw of the technical, rational and natural factors (the "mean preference" bounds)."""
    with torch.no_grad():
        text = pq_map.encode_quality_prompts(encoder, prompts)
        raw = pq_map.pair_probability(features.cls_embedding, text, encoder.logit_scale)  # (N, 4)
    return [float(value) for value in raw[:, 1:].mean(dim=0)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Learn toy-clip's quality prompts.")
    parser.add_argument("--checkpoint", type=Path, default=data.TOY_CLIP_CHECKPOINT)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--n-context", type=int, default=8)
    parser.add_argument("--patch-weight", type=float, default=0.0,
                        help="weight of a per-patch loss from the ground-truth masks (0 = image labels only, as "
                        "in the paper)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=data.TOY_PROMPTS)
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    encoder = load_quality_clip(args.checkpoint)
    train = data.perceptual_set(args.images, data.TRAIN_SEED_OFFSET + 10**6)
    features = encode_in_batches(encoder, train.images)
    patch_labels = None
    if args.patch_weight > 0:
        grid = features.patch_features.shape[1:3]
        pooled = torch.nn.functional.adaptive_avg_pool2d(train.factor_masks.float(), grid)  # (N, 3, gh, gw)
        factor_ok = (pooled < 0.1).float()
        patch_labels = torch.cat([factor_ok.amin(dim=1, keepdim=True), factor_ok], dim=1).permute(0, 2, 3, 1)
    result = train_quality_prompts(
        encoder, features, train.labels, steps=args.steps, n_context=args.n_context,
        patch_labels=patch_labels, patch_weight=args.patch_weight, seed=args.seed,
    )
    alpha = calibrated_alpha(encoder, features, result.prompts)
    metadata = {"tower": "toy-clip", "alpha": json.dumps(alpha), "patch_weight": str(args.patch_weight)}
    pq_map.save_prompt_embeddings(result.prompts, args.output, metadata)
    metrics = {
        "training_seconds": time.time() - start,
        "images": float(args.images),
        "steps": float(args.steps),
        "final_loss": sum(result.losses[-20:]) / len(result.losses[-20:]),
        "alpha_technical": alpha[0],
        "alpha_rational": alpha[1],
        "alpha_natural": alpha[2],
    }
    args.output.with_suffix(".metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return metrics


def load_alpha(path: Path = data.TOY_PROMPTS) -> tuple[float, float, float]:
    """The calibrated alpha stored in a toy prompt file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return tuple(json.loads(handle.metadata()["alpha"]))


if __name__ == "__main__":
    main()
