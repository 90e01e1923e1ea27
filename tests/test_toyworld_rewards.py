"""The toy-world rewards the preference benchmarks train and judge with (benchmarks/toyworld/rewards.py), checked
against pictures whose answer is known: rendered scenes, and hand computations of the red-content formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comfyui_refinery.benchmarks.toyworld import data, rewards, scenes

pytestmark = pytest.mark.needs(data.TOY_CLIP_CHECKPOINT.is_file(),  # skips without it, fails under CI (committed)
                               f"toy-clip is not trained yet ({data.TOY_CLIP_CHECKPOINT})")


def single_object_scenes(count: int, seed: int) -> list[scenes.Scene]:
    rng = np.random.default_rng(seed)
    found = []
    while len(found) < count:
        scene = scenes.sample_scene(rng, 64, max_groups=1)
        if scene.background == "plain" and scene.objects[0].count == 1:
            found.append(scene)
    return found


def as_images(pictures: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) pictures -> (B, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.stack(pictures)).float() / 255


def test_red_content_matches_its_formula_and_ignores_the_backgrounds():
    reward = rewards.RedContentReward()
    red = torch.tensor(scenes.COLOURS["red"], dtype=torch.float32) / 255
    picture = torch.full((1, 8, 8, 3), 128 / 255)
    picture[0, :2, :4] = red  # 8 of 64 pixels exactly red
    grey_distance = float((torch.full((3,), 128 / 255) - red).square().sum())
    grey_redness = math.exp(-grey_distance / (2 * 0.15**2))
    expected = -100 * (8 * 1.0 + 56 * grey_redness) / 64
    assert reward.score(picture) == pytest.approx(torch.tensor([expected]), abs=1e-5)
    assert grey_redness < 1e-3  # a grey background is not a red defect (it was 0.033 at width 0.25)
    image = picture.clone().requires_grad_(True)
    image.data[0, :2, :4] += 0.05  # near red, so the gradient is not zero there
    reward.score(image, differentiable=True).sum().backward()
    saliency = image.grad.abs().sum(-1)[0]
    assert saliency[:2, :4].min() > 100 * saliency[2:].max()


def test_attribute_judge_scores_rendered_scenes_by_the_share_of_right_attributes():
    judge = rewards.AttributeJudge()
    chosen = single_object_scenes(6, seed=7)
    pictures = as_images([scenes.render(scene) for scene in chosen])
    captions = [scenes.caption(scene) for scene in chosen]
    assert judge.score(pictures, captions).tolist() == [1.0] * 6
    wrong_colour = [next(c for c in scenes.COLOURS if c != scene.objects[0].colour) for scene in chosen]
    recoloured = as_images([scenes.render(scene, colours={0: colour}) for scene, colour in zip(chosen, wrong_colour)])
    # nothing of the asked colour: colour, shape, size and count all fail for the one group
    assert judge.score(recoloured, captions).tolist() == [0.0] * 6


def test_alignment_reward_prefers_the_caption_of_the_picture():
    reward = rewards.ToyAlignmentReward()
    chosen = single_object_scenes(12, seed=11)
    pictures = as_images([scenes.render(scene) for scene in chosen])
    captions = [scenes.caption(scene) for scene in chosen]
    swapped = captions[1:] + captions[:1]  # each picture with another scene's caption
    right, wrong = reward.score(pictures, captions), reward.score(pictures, swapped)
    assert right.shape == (12,) and torch.isfinite(right).all()
    assert (right > wrong).float().mean() >= 0.75, (right, wrong)
    with pytest.raises(ValueError, match="prompts"):
        reward.score(pictures, captions[:3])
