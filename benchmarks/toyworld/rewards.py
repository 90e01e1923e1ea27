"""Toy-world rewards for the preference benchmarks, with the reward interface of ``core/rewards``
(``name``, ``score(images (B, H, W, 3) float in [0, 1], prompts) -> (B,)``, ``.to(device)``).

- :func:`toy_clip_score`: CLIPScore on the shipped toy-clip (``core/rewards`` loader, kind "clip-score"): alignment.
- :class:`ToyQualityReward`: the G-Refine perceptual score p (PQ-Map, eq. 3) of toy-clip with the shipped learned
  quality prompts: perceptual quality, prompt-free.
- :class:`ToyAlignmentReward`: the G-Refine alignment score a (AQ-Map, eq. 4-8) of toy-clip: phrase-level
  alignment (object phrase, background phrase), a second alignment reward for Syn-Pic's ensemble.
- :class:`AttributeJudge` (``judge.py``): a GenEval-like judge, not a learned model: for any toy caption it finds
  the objects and scores the share of checks that pass (colour, shape, size and count of each group, and the
  relation of two groups), in [0, 1]. Used as the reward *not* used in training. (v1's judge scored only the
  colour and shape of single objects on plain backgrounds.)
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ...core import aq_map, pq_map
from ...core.clip_surgery import load_quality_clip
from ...core.rewards.loading import load_reward_model
from . import data, scenes
from .judge import AttributeJudge  # noqa: F401  (re-exported: the benchmarks' held-out reward)


def toy_clip_score():
    """CLIPScore (100 * max(cos, 0)) of the shipped toy-clip, loaded like any user's reward file."""
    return load_reward_model(data.TOY_CLIP_CHECKPOINT, "clip-score", architecture="auto")


class ToyQualityReward(torch.nn.Module):
    """p of g-refine.txt eq. 3 (``core/pq_map.perceptual_quality``) on toy-clip with the learned toy prompts: (B,)
    in [0, 1], higher = fewer perceptual defects. Prompt-free (prompts are accepted and ignored)."""

    uses_prompts = False

    def __init__(self):
        super().__init__()
        from .train_prompts import load_alpha

        self.name = "toy-quality-p"
        self.encoder = load_quality_clip(data.TOY_CLIP_CHECKPOINT)
        with torch.no_grad():
            self.register_buffer("prompt_features", pq_map.encode_quality_prompts(
                self.encoder, pq_map.load_prompt_embeddings(data.TOY_PROMPTS)))
        self.alpha = load_alpha(data.TOY_PROMPTS)

    def to(self, *args, **kwargs):
        self.encoder.model.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts=None, differentiable: bool = False) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
            raise ValueError(f"images must be (B, H, W, 3) with B >= 1, got {tuple(images.shape)}.")
        features = self.encoder.encode_image(images.float())
        quality = pq_map.perceptual_quality(features, self.prompt_features, self.encoder.logit_scale, self.alpha)
        return quality.score.float()


class ToyAlignmentReward(torch.nn.Module):
    """a of g-refine.txt eq. 8 (``core/aq_map.alignment_quality``: the global image-text cosine times the phrase
    penalty) on toy-clip: (B,), higher = better aligned with the prompt's phrases. Scored without gradient (Syn-Pic
    and evaluation only)."""

    uses_prompts = True

    def __init__(self):
        super().__init__()
        self.name = "toy-alignment-a"
        self.encoder = load_quality_clip(data.TOY_CLIP_CHECKPOINT)

    def to(self, *args, **kwargs):
        self.encoder.model.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts, differentiable: bool = False) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
            raise ValueError(f"images must be (B, H, W, 3) with B >= 1, got {tuple(images.shape)}.")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        features = self.encoder.encode_image(images.float())
        return aq_map.alignment_quality(self.encoder, features, prompts).score.float()


_PLAIN_CAPTION = re.compile(r"^an? (?:small |large )?(\w+) (\w+?)s? on a plain (\w+) background$")


def parse_single_object_caption(caption: str) -> tuple[str, str, str]:
    """(colour, shape, background colour) of a single-object, plain-background toy caption; ValueError otherwise."""
    found = _PLAIN_CAPTION.match(caption.strip())
    if not found or found[1] not in scenes.COLOURS or found[2] not in scenes.SHAPES \
            or found[3] not in scenes.BACKGROUND_COLOURS:
        raise ValueError(f"Not a single-object plain-background toy caption: {caption!r}")
    return found[1], found[2], found[3]


def single_object_captions(count: int, seed_offset: int, colours: tuple[str, ...] | None = None,
                           excluded: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """``count`` distinct-seeded single-object, plain-background captions (the kind tiny-sd was measured on); only
    objects of ``colours`` when given, never a caption of ``excluded`` (the draw is otherwise the same: excluded
    captions are skipped, not replaced by another random stream). ValueError when 1000 * count scenes give fewer than
    ``count`` captions (the filters leave too little of the caption space)."""
    rng = np.random.default_rng(seed_offset)
    captions = []
    for _ in range(1000 * max(count, 1)):
        if len(captions) == count:
            return captions
        scene = scenes.sample_scene(rng, 64, max_groups=1)
        if scene.background == "plain" and scene.objects[0].count == 1 and (
                colours is None or scene.objects[0].colour in colours):
            caption = scenes.caption(scene)
            if caption not in excluded:
                captions.append(caption)
    if len(captions) == count:
        return captions
    raise ValueError(f"Only {len(captions)} of {count} captions in {1000 * max(count, 1)} scenes: the colours "
                     f"{colours} and {len(excluded)} excluded captions leave too little of the caption space.")


class RedContentReward(torch.nn.Module):
    """A localisable "defect" reward for Focus-N-Fix, the toy counterpart of the paper's content classifiers
    (over-sexualisation, violence): red pixels are the defect. ``r = -100 * mean over pixels of
    exp(-||pixel - red||^2 / (2 * width^2))`` with red the toy world's (220, 30, 30) and RGB in [0, 1]: (B,) in
    [-100, 0], 0 = no red; differentiable, so its saliency |dr/dI| finds the red regions. Prompt-free.

    width 0.15 keeps the defect local: on 48 tiny-sd pictures of red objects, 99.3 % of the redness lies inside the
    problem regions M (``core/focus_n_fix.region_mask`` of the saliency). A width of 0.25 (the first setting) also
    counted faint tints of grey and coloured backgrounds (a grey pixel scores 0.033), so a third of the reward lay
    outside M and any method scored by removing it from the whole picture."""

    uses_prompts = False

    def __init__(self, width: float = 0.15):
        super().__init__()
        self.name = "red-content"
        self.width = width
        self.register_buffer("red", torch.tensor(scenes.COLOURS["red"], dtype=torch.float32) / 255)

    def score(self, images: torch.Tensor, prompts=None, differentiable: bool = False) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
            raise ValueError(f"images must be (B, H, W, 3) with B >= 1, got {tuple(images.shape)}.")
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            distance = (images.float() - self.red.to(images.device)).square().sum(dim=-1)  # (B, H, W)
            redness = torch.exp(-distance / (2 * self.width**2))
            return -100 * redness.flatten(1).mean(dim=1)
