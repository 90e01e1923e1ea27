"""Refinement plan (g-refine.txt eq. 9-10 as read in METHODS.md 1.4): strengths, step split, gate, masks, and the one
rule of whether a stage runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfyui_refinery.core.masks import MaskSettings
from comfyui_refinery.core.refine_plan import (
    ImagePlan,
    RefinerSettings,
    alignment_term,
    passes_gate,
    plan_refinement,
    split_steps,
    stage1_strength,
    stage_runs,
)


def test_stage1_strength_by_hand():
    assert stage1_strength(0.2, 0.2, 0.3, 0.8) == pytest.approx(0.8 - 0.5 * 0.2)
    assert stage1_strength(1.0, 1.0, 0.3, 0.8) == pytest.approx(0.3)
    assert stage1_strength(0.0, -0.2, 0.3, 0.8) == pytest.approx(0.8)  # clipped at s_max
    # lower quality gives a stronger stage 1
    assert stage1_strength(0.1, 0.1, 0.3, 0.8) > stage1_strength(0.9, 0.3, 0.3, 0.8)
    # nothing to align (a is None): the strength follows p alone
    assert stage1_strength(0.4, None, 0.3, 0.8) == pytest.approx(0.8 - 0.5 * 0.4)
    assert stage1_strength(1.0, None, 0.3, 0.8) == pytest.approx(0.3)


def test_strength_spans_its_range_on_the_probability_scale():
    """p and a are both probabilities: the strength reaches s_min and s_max, and a moves it as much as p does."""
    settings = RefinerSettings()
    low, high = settings.strength_min, settings.strength_max
    assert stage1_strength(1.0, 1.0, low, high) == pytest.approx(low)  # strength_min acts
    assert stage1_strength(0.0, 0.0, low, high) == pytest.approx(high)
    # a well-aligned and a misaligned picture of the same p: 0.5 * (0.9 - 0.2) / 2 apart
    assert stage1_strength(0.5, 0.2, low, high) - stage1_strength(0.5, 0.9, low, high) == pytest.approx(0.175)


def test_defaults_keep_stage2_for_gated_pictures_and_gate_a_on_the_probability_scale():
    settings = RefinerSettings()
    assert settings.skip_stage2_when_gated is False
    assert settings.alignment_gate == 0.7 and settings.perceptual_gate == 0.9
    assert passes_gate(0.95, 0.75, settings) and not passes_gate(0.95, 0.5, settings)
    assert not passes_gate(0.8, 0.95, settings)
    assert passes_gate(0.95, None, settings) and not passes_gate(0.85, None, settings)  # nothing to align: p only


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
    perceptual[1, 0:3, 0:3] = 0.2  # and one in picture 1, which passes the gate anyway
    alignment = torch.zeros(3, 8, 8)
    alignment[2, 0:2, 0:2] = 0.9  # an alignment defect in picture 2
    p, a = torch.tensor([0.4, 0.95, 0.8]), torch.tensor([0.2, 0.8, 0.1])
    plans = plan_refinement(perceptual, p, alignment, a, ["a cat"], RefinerSettings(mask=MaskSettings(threshold=0.5)))
    assert [plan.reason for plan in plans] == ["refine", "passed the quality gate", "refine"]
    assert plans[0].binary_mask[2:5, 2:5].all() and plans[0].binary_mask.sum() == 9
    assert plans[2].binary_mask[0:2, 0:2].all() and plans[2].binary_mask.sum() == 4
    # the gated picture skips stage 1 and, by default, still gets stage 2
    assert plans[1].skip_stage1 and not plans[1].skip_stage2
    assert [stage_runs(plan, 1) for plan in plans] == [True, False, True]
    assert [stage_runs(plan, 2) for plan in plans] == [True, True, True]
    assert plans[0].stage1_strength == pytest.approx(0.8 - 0.5 * 0.3)
    assert plans[2].stage1_strength == pytest.approx(0.8 - 0.5 * 0.45)
    assert plans[0].stage1_strength > plans[2].stage1_strength
    assert (plans[0].stage1_steps, plans[0].stage2_steps) == (10, 10)
    untouched = plan_refinement(perceptual, p, alignment, a, ["a cat"],
                                RefinerSettings(mask=MaskSettings(threshold=0.5), skip_stage2_when_gated=True))
    assert untouched[1].skip_stage1 and untouched[1].skip_stage2 and not stage_runs(untouched[1], 2)
    assert not untouched[0].skip_stage2 and not untouched[2].skip_stage2


@pytest.mark.parametrize("prompt", ["", "   ", "very beautiful", "highly detailed, best"])
def test_nothing_to_align_follows_p_alone(prompt):
    """An empty or noun-less prompt gets the AQ-Map's neutral a = 1: the strength must not count the picture's own
    defects less than p says (before: (p + 1) / 2, much weaker)."""
    perceptual = torch.full((2, 8, 8), 0.2)
    plans = plan_refinement(perceptual, torch.tensor([0.4, 0.95]), torch.zeros(2, 8, 8), torch.tensor([1.0, 1.0]),
                            [prompt], RefinerSettings(mask=MaskSettings(threshold=0.5)))
    assert plans[0].stage1_strength == pytest.approx(0.8 - 0.5 * 0.4)
    assert plans[0].reason == "refine"
    assert plans[1].reason == "passed the quality gate"  # gated on p alone
    assert alignment_term(1.0, prompt) is None


def test_the_aq_maps_neutral_score_is_the_plans_nothing_to_align_value():
    from comfyui_refinery.core.aq_map import EMPTY_PROMPT_SCORE
    from comfyui_refinery.core.refine_plan import NOTHING_TO_ALIGN_SCORE

    assert NOTHING_TO_ALIGN_SCORE == EMPTY_PROMPT_SCORE == 1.0


def test_alignment_counts_whenever_there_is_something_to_align_or_a_typed_value():
    assert alignment_term(1.0, "a cat") == 1.0  # a real, perfect score
    assert alignment_term(0.3, "") == pytest.approx(0.3)  # typed in by the user for an empty prompt: kept
    plans = plan_refinement(torch.full((2, 8, 8), 0.2), torch.tensor([0.4, 0.4]), torch.zeros(2, 8, 8),
                            torch.tensor([1.0, 0.3]), ["a red (cat:1.1)", ""])
    assert plans[0].stage1_strength == pytest.approx(0.8 - 0.5 * 0.7)
    assert plans[1].stage1_strength == pytest.approx(0.8 - 0.5 * 0.35)


def test_empty_mask_skips_stage1_only_and_counts_are_checked():
    plans = plan_refinement(torch.ones(1, 4, 4), torch.tensor([0.5]), torch.zeros(1, 4, 4), torch.tensor([0.1]),
                            ["x"])
    assert plans[0].skip_stage1 and not plans[0].skip_stage2 and plans[0].reason == "empty mask"
    with pytest.raises(ValueError, match="perceptual_scores has 2 entries for a batch of 1"):
        plan_refinement(torch.ones(1, 4, 4), torch.tensor([0.5, 0.5]), torch.zeros(1, 4, 4), torch.tensor([0.1]),
                        ["x"])


def hand_plan(**changes) -> ImagePlan:
    mask = torch.zeros(8, 8)
    mask[:4] = 1.0
    plan = ImagePlan(skip_stage1=False, skip_stage2=False, stage1_strength=0.6, stage2_strength=0.1, stage1_steps=2,
                     stage2_steps=2, binary_mask=mask, feathered_mask=mask, prompt="a cat", reason="hand-made")
    return dataclasses.replace(plan, **changes)


@pytest.mark.parametrize(
    "changes,stage1,stage2",
    [
        ({}, True, True),
        ({"skip_stage1": True}, False, True),
        ({"skip_stage2": True}, True, False),  # the stages are independent: skipping stage 2 keeps stage 1
        ({"skip_stage1": True, "skip_stage2": True}, False, False),
        ({"stage1_strength": 0.0}, False, True),
        ({"stage1_steps": 0}, False, True),
        ({"binary_mask": torch.zeros(8, 8)}, False, True),
        ({"stage2_strength": 0.0}, True, False),
        ({"stage2_steps": 0}, True, False),
    ],
)
def test_stage_runs_is_the_one_rule(changes, stage1, stage2):
    plan = hand_plan(**changes)
    assert (stage_runs(plan, 1), stage_runs(plan, 2)) == (stage1, stage2)


def test_stage_runs_takes_the_runners_own_mask():
    plan = hand_plan()
    assert not stage_runs(plan, 1, torch.zeros(1, 2, 2))  # a mask that vanished on the latent grid
    assert stage_runs(plan, 1, torch.tensor([[0.0, 0.3]]))  # soft masks count where > 0
    assert stage_runs(hand_plan(binary_mask=torch.zeros(8, 8)), 1, torch.ones(2, 2))
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        stage_runs(plan, 3)
