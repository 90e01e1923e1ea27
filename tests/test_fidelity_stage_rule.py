"""One rule for "does stage n run" (core/refine_plan.py ``stage_runs``), and both runners follow it: the diffusers
runner (core/diffusers_refiner.py) calls each stage pipeline exactly when the rule says so, and the ComfyUI stage
helpers (nodes/sampling.py ``stage_jobs``) sample exactly those images. Before, the diffusers runner skipped a picture
whose plan skips stage 2 altogether (its stage 1 too), while the ComfyUI nodes ran its stage 1."""

from __future__ import annotations

import dataclasses
import importlib
import sys

import pytest
import torch

from comfyui_refinery.core.refine_plan import ImagePlan, stage_runs

SIZE = 64
HALF = torch.zeros(SIZE, SIZE)
HALF[:, : SIZE // 2] = 1.0  # the left half: latent columns 0-3 at 8 px per cell

CASES = {
    "both": {},
    "skip stage 1": {"skip_stage1": True},
    "skip stage 2 only": {"skip_stage2": True},
    "skip both": {"skip_stage1": True, "skip_stage2": True},
    "stage-1 strength 0": {"stage1_strength": 0.0},
    "stage-1 no step": {"stage1_steps": 0},
    "empty mask": {"binary_mask": torch.zeros(SIZE, SIZE), "feathered_mask": torch.zeros(SIZE, SIZE)},
    "stage-2 strength 0": {"stage2_strength": 0.0},
    "stage-2 no step": {"stage2_steps": 0},
}


def case_plan(name: str) -> ImagePlan:
    plan = ImagePlan(skip_stage1=False, skip_stage2=False, stage1_strength=0.6, stage2_strength=0.3, stage1_steps=1,
                     stage2_steps=1, binary_mask=HALF, feathered_mask=HALF, prompt="a red circle", reason="hand-made")
    return dataclasses.replace(plan, **CASES[name])


EXPECTED = {  # (stage 1 runs, stage 2 runs), written out by hand
    "both": (True, True),
    "skip stage 1": (False, True),
    "skip stage 2 only": (True, False),
    "skip both": (False, False),
    "stage-1 strength 0": (False, True),
    "stage-1 no step": (False, True),
    "empty mask": (False, True),
    "stage-2 strength 0": (True, False),
    "stage-2 no step": (True, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_rule(name):
    plan = case_plan(name)
    assert (stage_runs(plan, 1), stage_runs(plan, 2)) == EXPECTED[name]


# -- the diffusers runner ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_stages(tmp_path_factory):
    from ci import importorskip

    importorskip("diffusers")  # under CI a missing test dependency fails
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    from comfyui_refinery.benchmarks.toyworld.sd_pipeline import build_pipeline

    pipeline = build_pipeline(0, tmp_path_factory.mktemp("tokenizer"))
    return (pipeline, AutoPipelineForInpainting.from_pipe(pipeline), AutoPipelineForImage2Image.from_pipe(pipeline))


class CountingStage:
    """A stage pipeline that counts its calls (everything else is the wrapped pipeline's)."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        self.calls += 1
        return self.pipe(**kwargs)


def test_diffusers_runner_follows_the_rule(diffusers_stages):
    from comfyui_refinery.core.diffusers_refiner import refine_with_pipeline

    pipeline, inpaint, img2img = diffusers_stages
    images = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    for name in CASES:
        plan = case_plan(name)
        stage1, stage2 = CountingStage(inpaint), CountingStage(img2img)
        result = refine_with_pipeline(pipeline, images, [plan], guidance_scale=2.0, progress=False,
                                      stage1_pipeline=stage1, stage2_pipeline=stage2)
        assert (stage1.calls, stage2.calls) == tuple(int(runs) for runs in EXPECTED[name]), name
        if EXPECTED[name] == (False, False):
            assert torch.equal(result.images, images), "a picture no stage runs for comes back bit-identical"


# -- the ComfyUI stage helpers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampling(comfy_harness):
    """nodes/sampling.py as ComfyUI loaded it (it imports comfy modules)."""
    node = comfy_harness.node_class("RefineryMaskedRedenoise")
    return importlib.import_module(sys.modules[node.__module__].__package__ + ".sampling")


@pytest.mark.comfyui
@pytest.mark.parametrize("mask_mode", ["binary", "soft"])
def test_comfyui_stage_helpers_follow_the_rule(sampling, mask_mode):
    plans = [case_plan(name) for name in CASES]
    masks = sampling.stage_masks(plans, (SIZE // 8, SIZE // 8), 8, mask_mode)  # (B, 1, 8, 8) latent masks
    first = {index for _, indices in sampling.stage_jobs(plans, 1, masks) for index in indices}
    second = {index for _, indices in sampling.stage_jobs(plans, 2) for index in indices}
    for index, name in enumerate(CASES):
        assert (index in first, index in second) == EXPECTED[name], name
    assert sampling.sampled_images(plans, masks) == [i for i, name in enumerate(CASES) if any(EXPECTED[name])]
