"""The AQ-Map's a on the probability scale, carried into the plan (METHODS.md 1.3-1.4): the tiny quality CLIP's AQ
result goes into ``plan_refinement`` as the nodes pass it (scores and emphasized prompts).

- A prompt with nothing to align (empty, or no noun) gives a = 1 and a stage-1 strength that follows p alone; before,
  a noun-less prompt gave the raw image-text cosine and the strength mixed it with p.
- With a noun, a is ``sigmoid(10 (cos(img, prompt) - cos(img, "")))`` times the cask penalty, in [0, 1], and enters
  the strength as (p + a) / 2.
"""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_refinery.core import aq_map
from comfyui_refinery.core.clip_surgery import load_quality_clip
from comfyui_refinery.core.refine_plan import RefinerSettings, plan_refinement
from tiny_models import build_tiny_vit


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_quality_clip(build_tiny_vit(tmp_path_factory.mktemp("quality_clip")))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def plan_from_aq(encoder, images, prompts, p):
    features = encoder.encode_image(images)
    alignment = aq_map.alignment_quality(encoder, features, prompts)
    settings = RefinerSettings(perceptual_gate=1.01)  # never gated: every picture gets a stage-1 strength
    perceptual = torch.zeros(images.shape[:3])  # everything poor: a full mask
    plans = plan_refinement(perceptual, p, alignment.map, alignment.score, alignment.emphasized_prompts, settings)
    return alignment, features, plans


@pytest.mark.parametrize("prompt", ["", "very beautiful", "highly detailed, extremely sharp"])
def test_nothing_to_align_follows_p_alone_end_to_end(encoder, prompt):
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    p = torch.tensor([0.2, 0.6])
    alignment, _, plans = plan_from_aq(encoder, images, [prompt], p)
    assert alignment.score.tolist() == [1.0, 1.0] and alignment.has_target == [False, False]
    assert [plan.stage1_strength for plan in plans] == pytest.approx([0.8 - 0.5 * 0.2, 0.8 - 0.5 * 0.6])


def test_a_is_a_probability_mixed_with_p(encoder):
    prompt = "a red circle next to a blue square"
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    p = torch.tensor([0.3, 0.3])
    alignment, features, plans = plan_from_aq(encoder, images, [prompt], p)
    assert alignment.has_target == [True, True]
    text, empty = encoder.encode_text([prompt, ""])
    for index in range(2):
        cls = features.cls_embedding[index]
        g = sigmoid(10.0 * float(cls @ text - cls @ empty))  # eq. 8's global term, by hand
        penalty = math.prod(min(row.phrase_score / 0.5, 1.0) for row in alignment.reports[index])
        a = alignment.score[index].item()
        assert a == pytest.approx(g * penalty, rel=1e-5) and 0.0 <= a <= 1.0
        assert plans[index].stage1_strength == pytest.approx(0.8 - 0.5 * (0.3 + a) / 2, rel=1e-6)
