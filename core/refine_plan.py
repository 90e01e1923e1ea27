"""The G-Refine balanced two-stage refiner's plan: what to re-denoise, where, how strongly (g-refine.txt eq. 9-10,
METHODS.md 1.4). Pure functions over the quality maps; the samplers (ComfyUI nodes, diffusers runner) only
execute a plan.

Our reading of eq. 9: the printed ``z1 = (p+a)/2 * QKV(prompt, Bi(1-P+A))`` makes strength grow with quality,
which contradicts the paper's own text ("the refining region has lower quality ... strong denoising"). We use
``denoise_1 = clip(s_max - (s_max - s_min) * (p + a) / 2, s_min, s_max)``: lower quality, stronger stage 1. p and a
are both probabilities in [0, 1] (PQ-Map, and AQ-Map's eq. 8 on the probability scale, METHODS.md 1.3), so the
strength spans the whole [s_min, s_max].

Nothing to align: a picture whose prompt is empty or has no noun gets a = 1 from the AQ-Map (its documented neutral
value). That must not make the picture's own defects count less, so such a picture's strength follows p alone,
``s_max - (s_max - s_min) * p``, and only p is gated (:func:`alignment_term`).

Stage 2 re-denoises the whole image with a tiny strength delta. A picture whose p and a both reach their gates
skips stage 1 ("minimised negative optimisation") and still gets stage 2, as the paper does (its stage 2 drives
the gains on high-quality pictures); ``skip_stage2_when_gated=True`` returns such pictures untouched instead.

Whether a stage re-denoises a picture is decided in one place, :func:`stage_runs`, which every runner (ComfyUI
nodes, diffusers runner) calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .masks import MaskSettings, refine_mask
from .prompt_parsing import parse_prompt


NOTHING_TO_ALIGN_SCORE = 1.0
"""The AQ-Map's a for an empty or noun-less prompt (core/aq_map.py ``EMPTY_PROMPT_SCORE``): with such a prompt it
means "no alignment term", and the stage-1 strength follows p alone (:func:`alignment_term`)."""

DEFAULT_MASK = MaskSettings(threshold=0.5, min_area=64, dilation=4, feather_sigma=4.0)
"""The refiner's mask post-processing by default (the nodes' widget defaults too): speckles under 64 px dropped,
grown by 4 px, feathered with sigma 4 px (METHODS.md 1.4: cleaned, dilated, feathered)."""


@dataclass(frozen=True)
class RefinerSettings:
    """Policy knobs of the refiner, validated on creation.

    strength_min/strength_max: stage-1 denoise range in [0, 1] (s_min <= s_max); global_strength: stage-2 delta
    in [0, 1]; total_steps: n1 + n2 of eq. 10 (the paper uses 20); stage1_share: fraction of the steps given to
    stage 1; perceptual_gate/alignment_gate: a picture with p >= perceptual_gate and a >= alignment_gate skips
    stage 1 (set a gate above 1 to never skip; a picture with nothing to align is gated on p alone);
    skip_stage2_when_gated: such a picture also skips stage 2 and comes back untouched (default False: it gets
    stage 2, as in the paper); mask: the Bi(1-P+A) post-processing.

    alignment_gate is on a's probability scale: a = 0.5 means the prompt fits the picture no better than the empty
    prompt, and 0.7 (the default) needs a cosine lead of ln(0.7 / 0.3) / 10 = 0.085 over "" at the AQ-Map's
    temperature 10 with no phrase under its bound. On the toy world (toy-clip, 160 pictures) 90 % of the correct
    pictures score a >= 0.70 while the median defective one scores 0.03-0.66.
    """

    strength_min: float = 0.3
    strength_max: float = 0.8
    global_strength: float = 0.1
    total_steps: int = 20
    stage1_share: float = 0.5
    perceptual_gate: float = 0.9
    alignment_gate: float = 0.7
    skip_stage2_when_gated: bool = False
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

    skip_stage1: the quality gate passed (or the mask is empty); skip_stage2: no stage 2 (a gated picture with
    ``skip_stage2_when_gated``); whether a stage runs also depends on its strength, steps and mask (:func:`stage_runs`);
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


def stage1_strength(perceptual_score: float, alignment_score: float | None, strength_min: float,
                    strength_max: float) -> float:
    """Stage-1 denoise of g-refine.txt eq. 9 as we read it: ``clip(s_max - (s_max - s_min) * q, s_min, s_max)`` with
    the quality ``q = (p + a) / 2``. p in [0, 1]; a is eq. 8's score in [0, 1] (core/aq_map.py), or None when the
    prompt has nothing to align (:func:`alignment_term`): then ``q = p``. Lower quality, stronger."""
    quality = perceptual_score if alignment_score is None else (perceptual_score + alignment_score) / 2
    value = strength_max - (strength_max - strength_min) * quality
    return float(min(max(value, strength_min), strength_max))


def alignment_term(alignment_score: float, prompt: str) -> float | None:
    """a as eq. 9 uses it: None (leave a out, the strength follows p alone) when the AQ-Map had nothing to align,
    i.e. ``prompt`` is empty or has no noun and a is the AQ-Map's neutral value 1 (core/aq_map.py
    ``EMPTY_PROMPT_SCORE``, :data:`NOTHING_TO_ALIGN_SCORE` here); else ``alignment_score``. A score typed in for a
    noun-less prompt (any other value) is the user's and is kept."""
    if alignment_score == NOTHING_TO_ALIGN_SCORE and not _has_phrases(prompt):
        return None
    return float(alignment_score)


@lru_cache(maxsize=256)
def _has_phrases(prompt: str) -> bool:
    return bool(parse_prompt(prompt).phrases)


def split_steps(total_steps: int, stage1_share: float) -> tuple[int, int]:
    """(n1, n2) of eq. 10: ``round(total * share)`` steps for stage 1, the rest for stage 2, each >= 1 when the
    total allows (a total of 1 goes to stage 1)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    first = min(max(round(total_steps * stage1_share), 1), total_steps)
    if first == total_steps and total_steps > 1 and stage1_share < 1:
        first -= 1
    return first, total_steps - first


def passes_gate(perceptual_score: float, alignment_score: float | None, settings: RefinerSettings) -> bool:
    """True when a picture is good enough to skip stage 1 (both scores at or above their gates; p alone when a is
    None, nothing to align)."""
    aligned = alignment_score is None or alignment_score >= settings.alignment_gate
    return perceptual_score >= settings.perceptual_gate and aligned


def stage_runs(plan: ImagePlan, stage: int, mask: torch.Tensor | None = None) -> bool:
    """Whether stage ``stage`` (1: masked, 2: global) re-denoises the picture of ``plan``: the one rule of every
    runner (ComfyUI nodes, diffusers runner).

    Stage 1 runs unless the plan skips it, its strength is 0, it has no step, or its mask is empty: the plan's
    binary mask, or ``mask`` when given (the runner's mask on its own grid, e.g. ComfyUI's latent mask). Stage 2
    runs unless the plan skips it, its strength is 0 or it has no step (a total of 1 step gives stage 2 none).
    The two stages are independent: a plan that skips stage 2 still runs its stage 1. A picture neither stage runs
    for comes back untouched."""
    if stage == 1:
        region = plan.binary_mask if mask is None else mask
        return (not plan.skip_stage1 and plan.stage1_strength > 0 and plan.stage1_steps >= 1
                and bool((region > 0).any()))
    if stage == 2:
        return not plan.skip_stage2 and plan.stage2_strength > 0 and plan.stage2_steps >= 1
    raise ValueError(f"stage must be 1 or 2, got {stage!r}.")


def plan_refinement(
    perceptual_map: torch.Tensor,
    perceptual_scores: torch.Tensor,
    alignment_map: torch.Tensor,
    alignment_scores: torch.Tensor,
    prompts: list[str],
    settings: RefinerSettings = RefinerSettings(),
) -> list[ImagePlan]:
    """One :class:`ImagePlan` per picture.

    perceptual_map P, alignment_map A: (B, H, W) in [0, 1]; perceptual_scores p, alignment_scores a: (B,) in
    [0, 1]; prompts: B prompts (the emphasized prompts of the AQ-Map) or 1 for all. A picture whose mask comes out
    empty skips stage 1 (nothing to fix locally); a gated one skips stage 1 too; both still get stage 2 unless
    ``settings.skip_stage2_when_gated`` returns gated pictures untouched. A picture whose prompt has nothing to align
    (AQ-Map a = 1 for an empty or noun-less prompt) is planned on p alone (:func:`alignment_term`).
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
        p = float(perceptual_scores[index])
        a = alignment_term(float(alignment_scores[index]), prompts[index])
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
