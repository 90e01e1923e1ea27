"""The keep-better guard and the detailer mode inside a real ComfyUI, on the random SD1.5-shaped checkpoint (CPU,
64x64, 1-2 steps): the checks are about which pixels come back, never about how a picture looks."""

from __future__ import annotations

import gc
import importlib
import sys

import pytest
import torch

from comfyui_refinery.core.keep_better import attempt_seed
from comfyui_refinery.core.refine_plan import ImagePlan

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]  # sample on one thread (2-core machine)

SIZE = 64
PROMPT = "a red circle next to a blue square"
SAMPLING = dict(sampler_name="euler", scheduler="normal", cfg=2.0)
KNOBS = dict(threshold=0.0, min_area=0, dilation=0, feather=2.0, strength_min=0.3, strength_max=0.8,
             global_strength=0.1, total_steps=2, stage1_share=0.5, perceptual_gate=1.01, alignment_gate=1.01,
             gated_untouched=True)


@pytest.fixture(scope="module")
def loaded(comfy_harness, sd15_models):
    """(model, clip, vae, quality encoder, pictures (2, 64, 64, 3) with content everywhere)."""
    import nodes

    from comfyui_refinery.core.clip_surgery import load_quality_clip

    model = nodes.UNETLoader().load_unet(sd15_models["unet"], "default")[0]
    clip = nodes.CLIPLoader().load_clip(sd15_models["text_encoders"], "stable_diffusion")[0]
    vae = nodes.VAELoader().load_vae(sd15_models["vae"])[0]
    encoder = load_quality_clip(str(comfy_harness.models_dir / "quality_clip" / "tiny-vit.safetensors"), "auto")
    y, x = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    first = torch.stack([x, y, (x + y) / 2], dim=-1)
    pictures = torch.stack([first, first.flip(0).roll(17, dims=1)])
    yield model, clip, vae, encoder, pictures
    del model, clip, vae
    gc.collect()


def run_g_refine(comfy_harness, loaded, **overrides):
    model, clip, vae, encoder, pictures = loaded
    node = comfy_harness.node_class("RefineryGRefine")
    arguments = dict(model=model, clip=clip, vae=vae, image=pictures, quality_clip=encoder, prompt=PROMPT,
                     negative_prompt="", seed=5, emphasis=1.1, **SAMPLING, **KNOBS) | overrides
    with torch.inference_mode():
        return node.execute(**arguments).result  # refined, mask, summary, plans, gains


def test_guard_returns_each_picture_refined_only_when_it_scored_better(comfy_harness, loaded):
    pictures = loaded[-1]
    unguarded = run_g_refine(comfy_harness, loaded, keep_better=False)[0]
    assert not torch.equal(unguarded, pictures)
    # a margin no change reaches: every picture comes back bit-identical, and the summary says why
    refined, _, summary, _, gains = run_g_refine(comfy_harness, loaded, margin=1.0)
    assert torch.equal(refined, pictures) and summary.count("input kept (not better)") == 2 and len(gains) == 2
    # margin 0, any drop tolerated: a picture is kept exactly when its gain is >= 0, and is then the unguarded one
    refined, _, summary, _, gains = run_g_refine(comfy_harness, loaded, margin=0.0, tolerance=1.0)
    for index, gain in enumerate(gains):
        expected = unguarded[index] if gain >= 0 else pictures[index]
        assert torch.equal(refined[index], expected), (index, gain, summary)


def test_attempts_use_derived_seeds_and_the_best_passing_one_is_kept(comfy_harness, loaded):
    pictures = loaded[-1]
    first = run_g_refine(comfy_harness, loaded, keep_better=False)[0]
    second = run_g_refine(comfy_harness, loaded, keep_better=False, seed=attempt_seed(5, 1))[0]
    assert not torch.equal(first, second)
    refined, _, summary, _, gains = run_g_refine(comfy_harness, loaded, attempts=2, margin=0.0, tolerance=1.0)
    for index in range(2):
        if "refined (attempt 1)" in summary.splitlines()[-2 + index]:
            assert torch.equal(refined[index], first[index])
        elif "refined (attempt 2)" in summary.splitlines()[-2 + index]:
            assert torch.equal(refined[index], second[index])
        else:
            assert torch.equal(refined[index], pictures[index])
    with pytest.raises(ValueError, match="attempts must be a whole number from 1 to 16, got 0"):
        run_g_refine(comfy_harness, loaded, attempts=0)


def test_keep_better_node_compares_two_batches(comfy_harness, loaded):
    _, _, _, encoder, pictures = loaded
    node = comfy_harness.node_class("RefineryKeepBetter")
    changed = (pictures * 0.5).contiguous()
    with torch.inference_mode():
        kept_image, kept, gains, table = node.execute(original=pictures, refined=pictures, quality_clip=encoder,
                                                      prompt=PROMPT).result
        assert torch.equal(kept_image, pictures) and kept == [False, False] and gains == [0.0, 0.0]  # no gain
        image, kept, gains, table = node.execute(original=pictures, refined=changed, quality_clip=encoder,
                                                 prompt=PROMPT, margin=0.0, tolerance=1.0).result
    for index in range(2):
        assert torch.equal(image[index], changed[index] if kept[index] else pictures[index])
        assert kept[index] == (gains[index] >= 0)
    assert table.count("\n") == 3  # header, rule, one row per picture
    with pytest.raises(ValueError, match=r"'original' pictures are \(64, 64\) but 'refined' ones are \(32, 32\)"):
        node.execute(original=pictures, refined=pictures[:, :32, :32], quality_clip=encoder, prompt=PROMPT)


def detailer_module(comfy_harness):
    node = comfy_harness.node_class("RefineryGRefine")
    return importlib.import_module(sys.modules[node.__module__].__package__ + ".detailer")


def region_plan(mask: torch.Tensor, feathered: torch.Tensor) -> ImagePlan:
    return ImagePlan(skip_stage1=False, skip_stage2=False, stage1_strength=0.7, stage2_strength=0.0, stage1_steps=1,
                     stage2_steps=1, binary_mask=mask, feathered_mask=feathered, prompt=PROMPT, reason="hand-made")


def test_detailer_changes_only_pixels_under_its_regions_feathered_masks(comfy_harness, loaded):
    """Three small regions (one in the middle, one 1-pixel region in the corner, two overlapping crops) and a picture
    with none: after the paste (no stage 2), pixels outside the feathered weights are the input's bit for bit."""
    from comfyui_refinery.core.detailer import DetailerSettings

    model, clip, vae, _, pictures = loaded
    detailer = detailer_module(comfy_harness)
    sampling = importlib.import_module(sys.modules[detailer.__name__].__package__ + ".sampling")
    mask = torch.zeros(SIZE, SIZE)
    mask[28:34, 28:34] = 1
    mask[0, 0] = 1  # at the border, one pixel
    mask[30, 40:43] = 1  # its crop overlaps the middle one's
    feathered = torch.nn.functional.max_pool2d(mask[None, None], 5, 1, 2)[0, 0] * 0.5 + mask * 0.5
    plans = [region_plan(mask, feathered), region_plan(torch.zeros(SIZE, SIZE), torch.zeros(SIZE, SIZE))]
    settings = DetailerSettings(max_region_fraction=0.2, native_resolution=64, multiple=8)
    planned = detailer.plan_detailer(plans, settings)
    assert [len(crops) for crops in planned.crops] == [3, 0]
    assert planned.inplace_plans[0].binary_mask.sum() == 0  # every region went to a crop
    progress = sampling.StageProgress(planned.steps(plans))
    with torch.inference_mode():
        result = detailer.detail_small_regions(model, vae, sampling.plan_conditioning(clip), pictures, plans,
                                               planned, 3, progress=progress, **SAMPLING)
    weight = torch.zeros(SIZE, SIZE)
    for crop in planned.crops[0]:
        top, left, height, width = crop.box
        weight[top:top + height, left:left + width] += crop.feathered
    outside = weight == 0
    assert torch.equal(result[0][outside], pictures[0][outside])
    assert not torch.equal(result[0][mask > 0], pictures[0][mask > 0]), "the regions were re-denoised"
    assert torch.equal(result[1], pictures[1]), "a picture without regions is untouched"
    torch.testing.assert_close(weight, feathered * (weight > 0))  # each pixel pasted once, by the plan's feather


def test_g_refine_detailer_mode_runs_and_reports_its_regions(comfy_harness, loaded):
    pictures = loaded[-1]
    refined, mask, summary, _, _ = run_g_refine(comfy_harness, loaded, keep_better=False, detailer_max_region=1.0,
                                                detailer_resolution=64, global_strength=0.0)
    assert "small region(s) re-denoised in crops" in summary
    assert bool(mask.all()) and not torch.equal(refined, pictures)  # threshold 0: one region, the whole picture
    # no region (threshold 1): stage 1 is skipped exactly as for a gated picture
    untouched, _, summary, _, _ = run_g_refine(comfy_harness, loaded, keep_better=False, detailer_max_region=1.0,
                                               threshold=1.0, global_strength=0.0)
    assert torch.equal(untouched, pictures) and "detailer" not in summary
