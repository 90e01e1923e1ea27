"""The diffusers runner of the two-stage refiner on a randomly initialised tiny SD pipeline (the same classes as
SD1.5): masks keep pixels, gated pictures are untouched, seeds reproduce, bad input is refused."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from comfyui_refinery.benchmarks.toyworld.sd_pipeline import build_pipeline  # noqa: E402
from comfyui_refinery.core.diffusers_refiner import refine_with_pipeline, scheduler_steps  # noqa: E402
from comfyui_refinery.core.masks import MaskSettings  # noqa: E402
from comfyui_refinery.core.refine_plan import RefinerSettings, plan_refinement  # noqa: E402


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_pipeline(0, tmp_path_factory.mktemp("tokenizer"))


def test_scheduler_steps_by_hand():
    assert scheduler_steps(10, 0.5) == 20
    assert scheduler_steps(10, 0.1) == 100
    assert scheduler_steps(3, 0.7) == 5  # int(5 * 0.7) = 3 steps run
    assert int(scheduler_steps(3, 0.7) * 0.7) == 3
    with pytest.raises(ValueError, match="strength must be in"):
        scheduler_steps(10, 0.0)


def make_plans(images, perceptual_scores, settings=RefinerSettings(total_steps=4, mask=MaskSettings())):
    perceptual = torch.ones(images.shape[:3])
    perceptual[:, :, :32] = 0.0  # the left half is poor
    return plan_refinement(perceptual, perceptual_scores, torch.zeros(images.shape[:3]),
                           torch.full((images.shape[0],), 0.1), ["a red circle on a plain black background"],
                           settings)


def test_stage1_keeps_pixels_outside_the_mask_and_gated_pictures_are_untouched(pipeline):
    torch.manual_seed(0)
    images = torch.rand(2, 64, 64, 3)
    plans = make_plans(images, torch.tensor([0.3, 0.95]), RefinerSettings(total_steps=4, alignment_gate=0.05, mask=MaskSettings()))
    assert not plans[0].skip_stage1 and plans[1].skip_stage2
    result = refine_with_pipeline(pipeline, images, plans, guidance_scale=2.0, progress=False)
    assert torch.equal(result.after_stage1[0, :, 32:], images[0, :, 32:])  # outside the mask: the input's pixels
    assert not torch.allclose(result.after_stage1[0, :, :32], images[0, :, :32], atol=1e-3)
    assert not torch.allclose(result.images[0, :, 32:], images[0, :, 32:], atol=1e-4)  # stage 2 is global
    assert torch.equal(result.images[1], images[1])  # passed the gate: bit-identical
    again = refine_with_pipeline(pipeline, images, plans, guidance_scale=2.0, progress=False)
    torch.testing.assert_close(again.images, result.images)


def test_bad_input_is_refused(pipeline):
    images = torch.rand(1, 64, 64, 3)
    plans = make_plans(images, torch.tensor([0.3]))
    with pytest.raises(ValueError, match="Got 1 plans for 2 pictures"):
        refine_with_pipeline(pipeline, torch.rand(2, 64, 64, 3), plans, progress=False)
    with pytest.raises(ValueError, match=r"mask of picture 0 is \(64, 64\) but the picture is \(32, 32\)"):
        refine_with_pipeline(pipeline, torch.rand(1, 32, 32, 3), plans, progress=False)
