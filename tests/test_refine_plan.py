"""Refinement plan (g-refine.txt eq. 9-10 as read in METHODS.md 1.4): strengths, step split, gate, masks."""

from __future__ import annotations

import pytest
import torch

from comfyui_refinery.core.masks import MaskSettings
from comfyui_refinery.core.refine_plan import RefinerSettings, plan_refinement, split_steps, stage1_strength


def test_stage1_strength_by_hand():
    assert stage1_strength(0.2, 0.2, 0.3, 0.8) == pytest.approx(0.8 - 0.5 * 0.2)
    assert stage1_strength(1.0, 1.0, 0.3, 0.8) == pytest.approx(0.3)
    assert stage1_strength(0.0, -0.2, 0.3, 0.8) == pytest.approx(0.8)  # clipped at s_max
    # lower quality gives a stronger stage 1
    assert stage1_strength(0.1, 0.1, 0.3, 0.8) > stage1_strength(0.9, 0.3, 0.3, 0.8)


def test_split_steps():
    assert split_steps(20, 0.5) == (10, 10)
    assert split_steps(20, 0.7) == (14, 6)
    assert split_steps(1, 0.5) == (1, 0)
    assert split_steps(2, 0.99) == (1, 1)
    assert split_steps(5, 0.0) == (1, 4)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        split_steps(0, 0.5)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="strength_min .* above strength_max"):
        RefinerSettings(strength_min=0.9, strength_max=0.2)
    with pytest.raises(ValueError, match="global_strength must be in"):
        RefinerSettings(global_strength=1.5)
    with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
        RefinerSettings(total_steps=0)


def test_each_picture_gets_its_own_plan():
    perceptual = torch.ones(3, 8, 8)
    perceptual[0, 2:5, 2:5] = 0.1  # a poor patch in picture 0
    alignment = torch.zeros(3, 8, 8)
    alignment[2, 0:2, 0:2] = 0.9  # an alignment defect in picture 2
    plans = plan_refinement(perceptual, torch.tensor([0.4, 0.95, 0.8]), alignment, torch.tensor([0.2, 0.35, 0.1]),
                            ["a cat"], RefinerSettings(mask=MaskSettings(threshold=0.5)))
    assert [plan.reason for plan in plans] == ["refine", "passed the quality gate", "refine"]
    assert plans[0].binary_mask[2:5, 2:5].all() and plans[0].binary_mask.sum() == 9
    assert plans[2].binary_mask[0:2, 0:2].all() and plans[2].binary_mask.sum() == 4
    assert plans[1].skip_stage1 and plans[1].skip_stage2
    assert plans[0].stage1_strength == pytest.approx(0.8 - 0.5 * 0.3)
    assert plans[0].stage1_strength > plans[2].stage1_strength
    assert (plans[0].stage1_steps, plans[0].stage2_steps) == (10, 10)


def test_empty_mask_skips_stage1_only_and_counts_are_checked():
    plans = plan_refinement(torch.ones(1, 4, 4), torch.tensor([0.5]), torch.zeros(1, 4, 4), torch.tensor([0.1]),
                            ["x"])
    assert plans[0].skip_stage1 and not plans[0].skip_stage2 and plans[0].reason == "empty mask"
    with pytest.raises(ValueError, match="perceptual_scores has 2 entries for a batch of 1"):
        plan_refinement(torch.ones(1, 4, 4), torch.tensor([0.5, 0.5]), torch.zeros(1, 4, 4), torch.tensor([0.1]),
                        ["x"])
