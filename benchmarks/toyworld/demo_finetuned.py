"""The demo's "refined models" part (``refinery-demo``, ``comfyui_refinery.demo``): the LoRAs the benchmarks trained on
tiny-sd and shipped in ``models/loras/`` (``<method>.safetensors``, written with ``core/lora_export.py``) against the
base model.

Each model draws the same held-out captions from the same initial noise; the pictures are scored with the toy
rewards (toy-clip CLIPScore, the G-Refine alignment score a, toy PQ score p, the attribute judge, red content),
and a grid (one row per caption, one column per model) plus a markdown table of the mean scores are returned to the
demo.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import rewards
from .data import MODELS_DIR

LORA_DIR = MODELS_DIR / "loras"
HELD_OUT_CAPTION_SEED = 909  # none of the benchmarks' training or evaluation captions


def shipped_loras(folder: Path = LORA_DIR) -> list[Path]:
    """The shipped LoRA files, sorted by name ([] when none are shipped)."""
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


@torch.no_grad()
def generate_with(pipeline, captions: list[str], steps: int, guidance: float, seed: int,
                  lora: Path | None = None) -> torch.Tensor:
    """(N, 64, 64, 3) pictures in [0, 1], caption i from generator seed ``seed + i``, with ``lora`` loaded (then
    unloaded) when given."""
    if lora is not None:
        from ...trainers.common.lora import load_lora_into_pipeline

        load_lora_into_pipeline(pipeline, lora, lora.stem.replace("-", "_"))
    try:
        generators = [torch.Generator().manual_seed(seed + index) for index in range(len(captions))]
        images = pipeline(captions, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                          generator=generators, output_type="pt").images
    finally:
        if lora is not None:
            pipeline.unload_lora_weights()
    return images.permute(0, 2, 3, 1).float().clamp(0, 1)


def finetuned_comparison(pipeline, count: int, steps: int, guidance: float, seed: int,
                         loras: list[Path] | None = None) -> tuple[list[str], list[list[torch.Tensor]], list[str]]:
    """Base model and every shipped LoRA on ``count`` held-out single-object captions.

    Returns (column titles, rows of (64, 64, 3) pictures (one row per caption), markdown lines: a table of mean
    reward per model). Empty lists when no LoRA is shipped."""
    loras = shipped_loras() if loras is None else loras
    if not loras:
        return [], [], []
    captions = rewards.single_object_captions(count, HELD_OUT_CAPTION_SEED)
    reward_models = [rewards.toy_clip_score(), rewards.ToyAlignmentReward(), rewards.ToyQualityReward(),
                     rewards.AttributeJudge(), rewards.RedContentReward()]
    titles = ["base tiny-sd"] + [f"+ {lora.stem} LoRA" for lora in loras]
    pictures = [generate_with(pipeline, captions, steps, guidance, seed, lora) for lora in [None, *loras]]
    header = "| model | " + " | ".join(reward.name for reward in reward_models) + " |"
    lines = ["## Refined models", "",
             f"The LoRAs shipped in `benchmarks/toyworld/models/loras/` against the base model: rankdpo / dpo "
             f"trained on Syn-Pic data of tiny-sd ranked by toy-clip and toy-alignment-a (`rankdpo_toyworld.py`), "
             f"focus-n-fix / draft trained to remove red (the red-content reward, `focus_n_fix_toyworld.py`); see "
             f"benchmarks/RESULTS.md. {count} held-out captions, the same initial noise for every model, mean toy "
             f"rewards (the attribute judge was used by no training).", "",
             header, "|" + "---|" * (header.count("|") - 1)]
    for title, images in zip(titles, pictures):
        means = [float(reward.score(images, captions).mean()) for reward in reward_models]
        lines.append(f"| {title} | " + " | ".join(f"{value:.3f}" for value in means) + " |")
    rows = [[images[index] for images in pictures] for index in range(count)]
    return titles, rows, lines + ["", "![refined models](finetuned.png)", ""]
