"""The G-Refine balanced two-stage refiner's plan: what to re-denoise, where, how strongly (g-refine.txt eq. 9-10,
METHODS.md 1.4). Pure functions over the quality maps; the samplers (ComfyUI nodes, diffusers runner) only
execute a plan.

Our reading of eq. 9: the printed ``z1 = (p+a)/2 * QKV(prompt, Bi(1-P+A))`` makes strength grow with quality,
which contradicts the paper's own text ("the refining region has lower quality ... strong denoising"). We use
``denoise_1 = clip(s_max - (s_max - s_min) * (p + a) / 2, s_min, s_max)``: lower quality, stronger stage 1.
Stage 2 re-denoises the whole image with a tiny strength delta. A picture whose p and a both reach their gates
skips stage 1 ("minimised negative optimisation"); with ``skip_stage2_when_gated`` (default) it is returned
untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .masks import MaskSettings, refine_mask


DEFAULT_MASK = MaskSettings(threshold=0.5, min_area=64, dilation=4, feather_sigma=4.0)
"""The refiner's mask post-processing by default (the nodes' widget defaults too): speckles under 64 px dropped,
grown by 4 px, feathered with sigma 4 px (METHODS.md 1.4: cleaned, dilated, feathered)."""


@dataclass(frozen=True)
class RefinerSettings:
    """Policy knobs of the refiner, validated on creation.

    strength_min/strength_max: stage-1 denoise range in [0, 1] (s_min <= s_max); global_strength: stage-2 delta
    in [0, 1]; total_steps: n1 + n2 of eq. 10 (the paper uses 20); stage1_share: fraction of the steps given to
    stage 1; perceptual_gate/alignment_gate: a picture with p >= perceptual_gate and a >= alignment_gate skips
    stage 1 (set a gate above 1 to never skip); mask: the Bi(1-P+A) post-processing.
    """

    strength_min: float = 0.3
    strength_max: float = 0.8
    global_strength: float = 0.1
    total_steps: int = 20
    stage1_share: float = 0.5
    perceptual_gate: float = 0.9
    alignment_gate: float = 0.3
    skip_stage2_when_gated: bool = True
    mask: MaskSettings = DEFAULT_MASK

    def __post_init__(self) -> None:
        for name in ("strength_min", "strength_max", "global_strength", "stage1_share"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
        if self.strength_min > self.strength_max:
            raise ValueError(
                f"strength_min ({self.strength_min}) is above strength_max ({self.strength_max}): swap them."
            )
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {self.total_steps!r}.")


@dataclass(frozen=True)
class ImagePlan:
    """The plan of one picture.

    skip_stage1: the quality gate passed (or the mask is empty); skip_stage2: returned untouched;
    stage1_strength, stage2_strength: denoise in [0, 1]; stage1_steps, stage2_steps: sampler steps (n1, n2);
    binary_mask, feathered_mask: (H, W) float in [0, 1]; prompt: the eq. 7 emphasized prompt for both stages.
    """

    skip_stage1: bool
    skip_stage2: bool
    stage1_strength: float
    stage2_strength: float
    stage1_steps: int
    stage2_steps: int
    binary_mask: torch.Tensor
    feathered_mask: torch.Tensor
    prompt: str
    reason: str


def stage1_strength(perceptual_score: float, alignment_score: float, strength_min: float, strength_max: float) -> float:
    """Stage-1 denoise of g-refine.txt eq. 9 as we read it: ``clip(s_max - (s_max - s_min) * (p + a) / 2, s_min,
    s_max)``. p in [0, 1]; a is eq. 8's score (a cosine times penalties, at most 1). Lower quality, stronger."""
    value = strength_max - (strength_max - strength_min) * (perceptual_score + alignment_score) / 2
    return float(min(max(value, strength_min), strength_max))


def split_steps(total_steps: int, stage1_share: float) -> tuple[int, int]:
    """(n1, n2) of eq. 10: ``round(total * share)`` steps for stage 1, the rest for stage 2, each >= 1 when the
    total allows (a total of 1 goes to stage 1)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    first = min(max(round(total_steps * stage1_share), 1), total_steps)
    if first == total_steps and total_steps > 1 and stage1_share < 1:
        first -= 1
    return first, total_steps - first


def passes_gate(perceptual_score: float, alignment_score: float, settings: RefinerSettings) -> bool:
    """True when a picture is good enough to skip stage 1 (both scores at or above their gates)."""
    return perceptual_score >= settings.perceptual_gate and alignment_score >= settings.alignment_gate


def plan_refinement(
    perceptual_map: torch.Tensor,
    perceptual_scores: torch.Tensor,
    alignment_map: torch.Tensor,
    alignment_scores: torch.Tensor,
    prompts: list[str],
    settings: RefinerSettings = RefinerSettings(),
) -> list[ImagePlan]:
    """One :class:`ImagePlan` per picture.

    perceptual_map P, alignment_map A: (B, H, W) in [0, 1]; perceptual_scores p, alignment_scores a: (B,);
    prompts: B prompts (the emphasized prompts of the AQ-Map) or 1 for all. A picture whose mask comes out empty
    skips stage 1 (nothing to fix locally) but still gets stage 2 unless it also passed the gate.
    """
    batch = perceptual_map.shape[0]
    if len(prompts) == 1:
        prompts = list(prompts) * batch
    for name, values in (("perceptual_scores", perceptual_scores), ("alignment_scores", alignment_scores),
                         ("prompts", prompts), ("alignment_map", alignment_map)):
        if len(values) != batch:
            raise ValueError(f"{name} has {len(values)} entries for a batch of {batch} pictures: give one per picture.")
    binary, feathered = refine_mask(perceptual_map, alignment_map, **settings.mask.__dict__)
    stage1_steps, stage2_steps = split_steps(settings.total_steps, settings.stage1_share)
    plans = []
    for index in range(batch):
        p, a = float(perceptual_scores[index]), float(alignment_scores[index])
        gated = passes_gate(p, a, settings)
        empty = not bool(binary[index].any())
        reason = "passed the quality gate" if gated else ("empty mask" if empty else "refine")
        plans.append(
            ImagePlan(
                skip_stage1=gated or empty,
                skip_stage2=gated and settings.skip_stage2_when_gated,
                stage1_strength=stage1_strength(p, a, settings.strength_min, settings.strength_max),
                stage2_strength=settings.global_strength,
                stage1_steps=stage1_steps,
                stage2_steps=stage2_steps,
                binary_mask=binary[index],
                feathered_mask=feathered[index],
                prompt=prompts[index],
                reason=reason,
            )
        )
    return plans
