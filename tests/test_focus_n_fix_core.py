"""core/focus_n_fix.py against hand computations: the regional constraint and objective (focus-n-fix.txt eq. 2), the
region function's mask from known heatmaps, the saliency map and the differentiability check."""

import math

import pytest
import torch

from comfyui_refinery.core import focus_n_fix
from comfyui_refinery.core.focus_n_fix import NotDifferentiableError, RegionSettings


def test_regional_constraint_matches_a_hand_computation():
    # one 2x2 RGB image; mask frees the top-left pixel
    reference = torch.tensor([[[[0.5, 0.5, 0.5], [1.0, 0.0, 0.0]], [[0.2, 0.2, 0.2], [0.0, 0.0, 1.0]]]])
    generated = torch.tensor([[[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[0.2, 0.2, 0.6], [0.0, 0.0, 1.0]]]])
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # outside the mask: (1,0,0) vs 0 -> 1.0^2; (0.2,0.2,0.2) vs (0.2,0.2,0.6) -> 0.4^2; last pixel equal
    expected = math.sqrt(1.0 + 0.16)
    value = focus_n_fix.regional_constraint(reference, generated, mask)
    assert value.shape == (1,)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # a soft mask weighs the difference: half of the second pixel kept -> (0.5 * 1.0)^2 + 0.16
    soft = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    assert focus_n_fix.regional_constraint(reference, generated, soft).item() == pytest.approx(math.sqrt(0.25 + 0.16))


def test_constraint_is_per_image_and_gradient_flows_only_into_the_generated_image():
    reference = torch.rand(3, 4, 5, 3)
    generated = torch.rand(3, 4, 5, 3, requires_grad=True)
    mask = (torch.rand(3, 4, 5) > 0.5).float()
    values = focus_n_fix.regional_constraint(reference, generated, mask)
    for index in range(3):
        single = focus_n_fix.regional_constraint(reference[index:index + 1], generated[index:index + 1].detach(),
                                                 mask[index:index + 1])
        assert values[index].item() == pytest.approx(single.item(), rel=1e-6)
    values.sum().backward()
    # d||v|| / d generated = -(1 - M) * v / ||v||, zero inside the mask
    difference = (1 - mask).unsqueeze(-1) * (reference - generated.detach())
    expected = -(1 - mask).unsqueeze(-1) * difference / values.detach().view(-1, 1, 1, 1)
    assert torch.allclose(generated.grad, expected, atol=1e-6)
    assert torch.all(generated.grad[mask.bool()] == 0)


def test_constraint_gradient_at_equality_is_zero_not_nan():
    reference = torch.rand(2, 4, 4, 3)
    generated = reference.clone().requires_grad_(True)
    value = focus_n_fix.regional_constraint(reference, generated, torch.zeros(2, 4, 4))
    value.sum().backward()
    assert torch.all(value == 0)
    assert torch.all(generated.grad == 0)


def test_objective_is_reward_minus_beta_times_constraint_and_beta_zero_is_draft():
    reward = torch.tensor([1.0, -2.0])
    constraint = torch.tensor([0.5, 3.0])
    assert torch.allclose(focus_n_fix.objective(reward, constraint, 2.0), torch.tensor([0.0, -8.0]))
    assert torch.equal(focus_n_fix.objective(reward, constraint, 0.0), reward)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            focus_n_fix.objective(reward, constraint, bad)


def test_constraint_rejects_mismatched_shapes_with_a_clear_message():
    with pytest.raises(ValueError, match="same shape"):
        focus_n_fix.regional_constraint(torch.rand(1, 4, 4, 3), torch.rand(1, 8, 8, 3), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="mask must be"):
        focus_n_fix.regional_constraint(torch.rand(1, 4, 4, 3), torch.rand(1, 4, 4, 3), torch.zeros(1, 8, 8))


def test_region_mask_from_a_known_heatmap_keeps_the_main_region_and_dilates_it():
    # 64 px: the 512-px kernel 16 / sigma 4 / dilation 16 become 2 / 0.5 / 2
    heatmap = torch.zeros(1, 64, 64)
    heatmap[0, 20:30, 10:20] = 5.0  # the main defect, 100 px
    heatmap[0, 50:52, 50:52] = 4.0  # a small one, 4 px
    settings = RegionSettings(threshold=0.5, max_regions=1)
    assert focus_n_fix.smoothing_for(settings, 64, 64) == (2, 0.5, 2)
    mask, states = focus_n_fix.region_mask(heatmap, settings)
    assert states == ["ok"]
    assert mask[0, 50:52, 50:52].sum() == 0  # only the main connected region is kept
    # by hand: the even kernel [0.5, 0.5] averages each pixel with the next one (rows, then columns), so the block's
    # smoothed values are 5 inside rows/cols 20..28 / 10..18, 2.5 on the next edge and 1.25 in the corner; after the
    # peak normalisation only the 9x9 block 20..28 x 10..18 is > 0.5; the radius-2 disc (dx^2 + dy^2 <= 2.5^2) adds
    # one column on each side for 2 rows out, two columns for 1 row out
    expected = torch.zeros(64, 64)
    expected[18:31, 9:20] = 1
    expected[19:30, 8:21] = 1
    assert torch.equal(mask[0], expected)
    # every region kept with max_regions 0
    both, _ = focus_n_fix.region_mask(heatmap, RegionSettings(threshold=0.5, max_regions=0))
    assert both[0, 50:52, 50:52].all()


def test_region_mask_reports_empty_and_full_masks():
    empty, states = focus_n_fix.region_mask(torch.zeros(2, 16, 16))
    assert states == ["empty", "empty"] and empty.sum() == 0
    full, states = focus_n_fix.region_mask(torch.full((1, 16, 16), 3.0))
    assert states == ["full"] and bool(full.all())
    # "none" normalisation thresholds the values themselves: a map at 0.2 everywhere is below 0.3
    _, states = focus_n_fix.region_mask(torch.full((1, 16, 16), 0.2), RegionSettings(normalization="none"))
    assert states == ["empty"]


def test_region_mask_rejects_bad_heatmaps_and_settings():
    with pytest.raises(ValueError, match=">= 0"):
        focus_n_fix.region_mask(-torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        focus_n_fix.region_mask(torch.full((1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="threshold"):
        RegionSettings(threshold=1.5)
    with pytest.raises(ValueError, match="normalization"):
        RegionSettings(normalization="max")


def test_saliency_is_the_absolute_pixel_gradient_max_over_channels():
    weights = torch.zeros(8, 8, 3)
    weights[1:3, 2:4, 0] = -3.0  # the reward falls where the red channel rises in a 2x2 block
    weights[1:3, 2:4, 1] = 1.0

    def reward(images, prompts):
        assert prompts == ["a", "b"]
        return (images * weights).flatten(1).sum(1)

    saliency = focus_n_fix.saliency_heatmap(reward, torch.rand(2, 8, 8, 3), ["a", "b"])
    expected = weights.abs().amax(-1).expand(2, 8, 8)
    assert torch.equal(saliency, expected)
    assert not saliency.requires_grad


def test_quality_map_heatmap_is_the_refiners_defect_map():
    perceptual = torch.tensor([[[1.0, 0.25], [0.5, 0.0]]])
    alignment = torch.tensor([[[0.0, 0.5], [0.0, 0.0]]])
    assert torch.allclose(focus_n_fix.quality_map_heatmap(perceptual, alignment),
                          torch.tensor([[[0.0, 1.0], [0.5, 1.0]]]))
    assert torch.allclose(focus_n_fix.quality_map_heatmap(perceptual), 1 - perceptual)


def test_check_differentiable_names_a_reward_without_gradient():
    focus_n_fix.check_differentiable(lambda images, prompts: images.mean(dim=(1, 2, 3)), "mean brightness")
    with pytest.raises(NotDifferentiableError, match="'thresholded' is not differentiable"):
        focus_n_fix.check_differentiable(lambda images, prompts: (images > 0.4).float().mean(dim=(1, 2, 3)),
                                         "thresholded")
    with pytest.raises(NotDifferentiableError, match="'detached'"):
        focus_n_fix.check_differentiable(lambda images, prompts: images.detach().mean(dim=(1, 2, 3)), "detached")
    with pytest.raises(NotDifferentiableError, match="saliency"):
        focus_n_fix.saliency_heatmap(lambda images, prompts: torch.zeros(images.shape[0]), torch.rand(1, 4, 4, 3),
                                     ["x"])
