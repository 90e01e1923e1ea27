"""The G-Refine refiner nodes inside a real ComfyUI 0.8 (in-process, CPU) with a random SD1.5-shaped UNet, CLIP-L and
VAE (``sd15_checkpoint.py``, built once per machine): real graphs from LoadImage to SaveImage, the masked stage's
bit-identity outside its mask, per-image masks and strengths, gated images returned untouched, progress and
interruption, and bad inputs that fail clearly without breaking the next prompt.

The weights are random, so the checks are about what is kept, what changes, shapes and messages, never about how the
refined pictures look. Pictures are 64x64 and stages run 1 step so the file stays within a few minutes on CPU.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_harness import GraphResult

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]  # sample on one thread (2-core machine)

SIZE = 64
PICTURES = ("refine_a.png", "refine_b.png")
PROMPT = "a red circle next to a blue square"
SAMPLING = dict(sampler_name="euler", scheduler="normal", cfg=2.0)
NEVER_GATED = dict(perceptual_gate=1.01, alignment_gate=1.01, gated_untouched=True)
KNOBS = dict(threshold=0.0, min_area=0, dilation=0, feather=2.0, strength_min=0.3, strength_max=0.8,
             global_strength=0.1, total_steps=2, stage1_share=0.5, **NEVER_GATED)
GUARD_OFF = dict(keep_better=False)  # these tests check what sampling does; the guard has its own tests
_RUNS = itertools.count(1)


# -- fixtures and graph pieces ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pictures(comfy_harness) -> tuple[str, str]:
    """Two 64x64 RGB pictures in input/ (the session's picture.png is 64x48): real content everywhere, so a
    changed or kept pixel is visible."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    first = np.zeros((SIZE, SIZE, 3), np.uint8)
    first[..., 1] = (x * 255 // (SIZE - 1)).astype(np.uint8)
    first[..., 2] = (y * 255 // (SIZE - 1)).astype(np.uint8)
    first[(x - 20) ** 2 + (y - 30) ** 2 < 150] = (230, 20, 20)
    second = np.roll(first[::-1], 17, axis=1).copy()
    second[40:56, 8:30] = (240, 240, 30)
    for name, pixels in zip(PICTURES, (first, second)):
        Image.fromarray(pixels, "RGB").save(comfy_harness.input_dir / name)
    return PICTURES


def graph_builder():
    from comfy_execution.graph_utils import GraphBuilder

    return GraphBuilder(prefix="")


def add_models(graph, sd15_models):
    unet = graph.node("UNETLoader", unet_name=sd15_models["unet"], weight_dtype="default")
    clip = graph.node("CLIPLoader", clip_name=sd15_models["text_encoders"], type="stable_diffusion")
    vae = graph.node("VAELoader", vae_name=sd15_models["vae"])
    return unet, clip, vae


def add_images(graph, names):
    loads = [graph.node("LoadImage", image=name) for name in names]
    image = loads[0]
    for other in loads[1:]:
        image = graph.node("ImageBatch", image1=image.out(0), image2=other.out(0))
    return image


def add_text(graph, clip, text):
    return graph.node("CLIPTextEncode", clip=clip.out(0), text=text)


def add_maps(graph, image):
    quality = graph.node("RefineryQualityModelLoader", checkpoint="tiny-vit.safetensors", architecture="auto",
                         surgery_depth=0)
    pq = graph.node("RefineryPQMap", quality_clip=quality.out(0), image=image.out(0), alpha_technical=0.5,
                    alpha_rational=0.5, alpha_natural=0.5, temperature=0.0)
    aq = graph.node("RefineryAQMap", quality_clip=quality.out(0), image=image.out(0), prompt=PROMPT, noun_bound=0.5,
                    phrase_bound=0.5, emphasis=1.1)
    return quality, pq, aq


def add_plan(graph, pq, aq, **knobs):
    return graph.node("RefineryRefinePlan", perceptual_map=pq.out(0), perceptual_score=pq.out(1),
                      alignment_map=aq.out(0), alignment_score=aq.out(1), prompt=aq.out(2), **(KNOBS | knobs))


def add_solid_plan(graph, perceptual: float, alignment: float, **knobs):
    """A plan from constant maps: 1-P+A is the same everywhere, so the mask is all-zero or all-one."""
    p_map = graph.node("SolidMask", value=perceptual, width=SIZE, height=SIZE)
    a_map = graph.node("SolidMask", value=alignment, width=SIZE, height=SIZE)
    return graph.node("RefineryRefinePlan", perceptual_map=p_map.out(0), perceptual_score=0.2,
                      alignment_map=a_map.out(0), alignment_score=0.1, prompt=PROMPT, **(KNOBS | knobs))


def add_stage(graph, node_type, unet, positive, negative, latent, plan, seed=0, **extra):
    return graph.node(node_type, model=unet.out(0), positive=positive.out(0), negative=negative.out(0),
                      latent=latent.out(0), plan=plan.out(0), seed=seed, **SAMPLING, **extra)


def assert_ok(result: GraphResult) -> None:
    assert result.success, f"graph failed:\n{result.error_text()}"


def add_mask_save(graph, mask, prefix: str):
    """SaveImage of a MASK output (through MaskToImage), read back with :func:`saved_pixels`."""
    return graph.node("SaveImage", images=graph.node("MaskToImage", mask=mask).out(0), filename_prefix=prefix)


def saved_pixels(harness, result, node) -> list[np.ndarray]:
    files = harness.output_files(result, node.id)
    assert files, f"node {node.id} reported no files: {result.outputs.get(node.id)}"
    out = []
    for path in files:
        with Image.open(path) as picture:
            out.append(np.asarray(picture.convert("RGB")))
    return out


def input_pixels(harness, name) -> np.ndarray:
    with Image.open(harness.input_dir / name) as picture:
        return np.asarray(picture.convert("RGB"))


def failure(result: GraphResult, node) -> str:
    """The execution error message of a run that must have failed in ``node``."""
    assert not result.success
    error = result.execution_error
    assert error is not None and error["node_id"] == node.id, result.error_text()
    assert error["exception_type"].endswith("ValueError"), error
    return error["exception_message"]


def stage_failure(harness, graph, node_type, unet, clip, latent, plan, **extra) -> str:
    """Add a ``node_type`` stage on ``latent`` (PROMPT against "") that must fail, run the graph, return the message."""
    stage = add_stage(graph, node_type, unet, add_text(graph, clip, PROMPT), add_text(graph, clip, ""), latent, plan,
                      **extra)
    graph.node("PreviewAny", source=stage.out(0))
    return failure(harness.run_graph(graph), stage)


def good_prompt_still_runs(harness, sd15_models, pictures) -> None:
    """After a failure the queue goes on: plan -> masked re-denoise (1 step, new seed so it really runs) -> save."""
    seed = next(_RUNS)
    graph = graph_builder()
    unet, clip, vae = add_models(graph, sd15_models)
    image = add_images(graph, pictures[:1])
    latent = graph.node("VAEEncode", pixels=image.out(0), vae=vae.out(0))
    plan = add_solid_plan(graph, 0.2, 0.0)
    stage = add_stage(graph, "RefineryMaskedRedenoise", unet, add_text(graph, clip, PROMPT), add_text(graph, clip, ""),
                      latent, plan, seed=seed, pixels_per_latent=8)
    decoded = graph.node("VAEDecode", samples=stage.out(0), vae=vae.out(0))
    save = graph.node("SaveImage", images=decoded.out(0), filename_prefix=f"recovery_{seed}")
    result = harness.run_graph(graph)
    assert_ok(result)
    assert result.did_run(stage.id)
    assert [pixels.shape for pixels in saved_pixels(harness, result, save)] == [(SIZE, SIZE, 3)]


@pytest.fixture(scope="module")
def loaded(comfy_harness, sd15_models, pictures):
    """ComfyUI's own loaders, called directly: (model, clip, vae, images (2, 64, 64, 3))."""
    import nodes

    model = nodes.UNETLoader().load_unet(sd15_models["unet"], "default")[0]
    clip = nodes.CLIPLoader().load_clip(sd15_models["text_encoders"], "stable_diffusion")[0]
    vae = nodes.VAELoader().load_vae(sd15_models["vae"])[0]
    images = torch.stack([torch.from_numpy(input_pixels(comfy_harness, name).copy()).float() / 255.0
                          for name in pictures])
    return model, clip, vae, images


def hand_plan(mask: torch.Tensor, strength: float = 0.6, skip_stage1=False, skip_stage2=False, steps=(1, 1),
              feathered: torch.Tensor | None = None):
    from comfyui_refinery.core.refine_plan import ImagePlan

    return ImagePlan(skip_stage1=skip_stage1, skip_stage2=skip_stage2, stage1_strength=strength,
                     stage2_strength=0.2, stage1_steps=steps[0], stage2_steps=steps[1], binary_mask=mask,
                     feathered_mask=mask if feathered is None else feathered, prompt=PROMPT, reason="hand-made")


# -- schemas ---------------------------------------------------------------------------------------------------------
REFINER_NODE_IDS = ("RefineryRefinePlan", "RefineryMaskedRedenoise", "RefineryGlobalRedenoise", "RefineryGRefine")


def test_refiner_nodes_load_with_their_schemas(comfy_harness):
    import nodes

    assert comfy_harness.pack_import_failures() == []
    for name in REFINER_NODE_IDS:
        cls = nodes.NODE_CLASS_MAPPINGS[name]
        schema = cls.GET_SCHEMA()
        assert schema.node_id == name and schema.category == "Refinery/refine"
        info = cls.INPUT_TYPES()
        assert "required" in info and name in nodes.NODE_DISPLAY_NAME_MAPPINGS
        outputs = {output.id for output in schema.outputs}
        inputs = {entry.id for entry in schema.inputs}
        assert not outputs & inputs, f"{name}: output ids shadow inputs {outputs & inputs}"
    plan = nodes.NODE_CLASS_MAPPINGS["RefineryRefinePlan"]
    assert plan.INPUT_IS_LIST is True
    assert plan.INPUT_TYPES()["required"]["total_steps"][1]["min"] == 1
    optional = nodes.NODE_CLASS_MAPPINGS["RefineryGRefine"].INPUT_TYPES()["optional"]
    assert set(optional) == {"mask_mode", "quality_prompts", "positive", "negative", "stage1_model", "keep_better",
                             "attempts", "margin", "tolerance", "reward_weight", "reward", "detailer_max_region",
                             "detailer_resolution"}


# -- real graphs ---------------------------------------------------------------------------------------------------
def test_modular_graph_maps_plan_two_stages_decode_save(comfy_harness, sd15_models, pictures):
    graph = graph_builder()
    unet, clip, vae = add_models(graph, sd15_models)
    image = add_images(graph, pictures[:1])
    _, pq, aq = add_maps(graph, image)
    plan = add_plan(graph, pq, aq)
    positive, negative = add_text(graph, clip, "a red circle, (blue square:1.1)"), add_text(graph, clip, "")
    latent = graph.node("VAEEncode", pixels=image.out(0), vae=vae.out(0))
    stage1 = add_stage(graph, "RefineryMaskedRedenoise", unet, positive, negative, latent, plan, pixels_per_latent=8)
    stage2 = add_stage(graph, "RefineryGlobalRedenoise", unet, positive, negative, stage1, plan, seed=1)
    decoded = graph.node("VAEDecode", samples=stage2.out(0), vae=vae.out(0))
    save = graph.node("SaveImage", images=decoded.out(0), filename_prefix="modular")
    mask_save = add_mask_save(graph, plan.out(1), "modular_mask")
    feathered_save = add_mask_save(graph, plan.out(2), "modular_feathered")
    summary = graph.node("PreviewAny", source=plan.out(3))

    result = comfy_harness.run_graph(graph)

    assert_ok(result)
    assert all(result.did_run(node.id) for node in (plan, stage1, stage2, decoded))
    (refined,) = saved_pixels(comfy_harness, result, save)
    assert refined.shape == (SIZE, SIZE, 3)
    assert not np.array_equal(refined, input_pixels(comfy_harness, pictures[0]))
    assert [m.shape for m in saved_pixels(comfy_harness, result, mask_save)] == [(SIZE, SIZE, 3)]
    assert [m.shape for m in saved_pixels(comfy_harness, result, feathered_save)] == [(SIZE, SIZE, 3)]
    (text,) = result.outputs[plan.id]["text"]
    assert text.startswith("image 0: refine (p ") and "stage 1: strength" in text and "1 steps" in text
    assert result.outputs[summary.id]["text"] == [text]


def test_all_in_one_graph_on_a_batch_with_every_input_wired(comfy_harness, sd15_models, pictures):
    graph = graph_builder()
    unet, clip, vae = add_models(graph, sd15_models)
    image = add_images(graph, pictures)
    quality = graph.node("RefineryQualityModelLoader", checkpoint="tiny-vit.safetensors", architecture="auto",
                         surgery_depth=0)
    prompts = graph.node("RefineryQualityPromptsLoader", prompts="text prompts (any tower)")
    refine = graph.node(
        "RefineryGRefine", model=unet.out(0), clip=clip.out(0), vae=vae.out(0), image=image.out(0),
        quality_clip=quality.out(0), prompt=PROMPT, negative_prompt="blurry", seed=3, emphasis=1.2,
        quality_prompts=prompts.out(0), positive=add_text(graph, clip, PROMPT).out(0),
        negative=add_text(graph, clip, "blurry").out(0), stage1_model=unet.out(0), **SAMPLING, **KNOBS, **GUARD_OFF,
    )
    save = graph.node("SaveImage", images=refine.out(0), filename_prefix="grefine")
    mask_save = add_mask_save(graph, refine.out(1), "grefine_mask")
    summary = graph.node("PreviewAny", source=refine.out(2))

    result = comfy_harness.run_graph(graph)

    assert_ok(result)
    refined = saved_pixels(comfy_harness, result, save)
    assert [pixels.shape for pixels in refined] == [(SIZE, SIZE, 3)] * 2
    for pixels, name in zip(refined, pictures):
        assert not np.array_equal(pixels, input_pixels(comfy_harness, name))
    assert len(saved_pixels(comfy_harness, result, mask_save)) == 2
    (text,) = result.outputs[summary.id]["text"]
    assert text.count("\n") == 1 and "image 1: refine" in text


def test_all_in_one_returns_gated_images_bit_identical(comfy_harness, sd15_models, pictures, loaded):
    """Gates at their minimum: every image passes and comes back untouched (graph: same PNG; direct: same tensor)."""
    gated = KNOBS | dict(perceptual_gate=0.0, alignment_gate=-1.0)
    graph = graph_builder()
    unet, clip, vae = add_models(graph, sd15_models)
    image = add_images(graph, pictures)
    quality = graph.node("RefineryQualityModelLoader", checkpoint="tiny-vit.safetensors", architecture="auto",
                         surgery_depth=0)
    refine = graph.node("RefineryGRefine", model=unet.out(0), clip=clip.out(0), vae=vae.out(0), image=image.out(0),
                        quality_clip=quality.out(0), prompt=PROMPT, negative_prompt="", seed=0, emphasis=1.1,
                        **SAMPLING, **gated)
    save = graph.node("SaveImage", images=refine.out(0), filename_prefix="gated")
    result = comfy_harness.run_graph(graph)
    assert_ok(result)
    for pixels, name in zip(saved_pixels(comfy_harness, result, save), pictures):
        assert np.array_equal(pixels, input_pixels(comfy_harness, name))
    summary = result.outputs[refine.id]["text"][0]
    assert summary.count("passed the quality gate (p ") == summary.count(") | untouched") == 2, summary

    model, clip_model, vae_model, images = loaded
    from comfyui_refinery.core.clip_surgery import load_quality_clip

    encoder = load_quality_clip(str(comfy_harness.models_dir / "quality_clip" / "tiny-vit.safetensors"), "auto")
    node = comfy_harness.node_class("RefineryGRefine")
    with torch.inference_mode():
        out = node.execute(model=model, clip=clip_model, vae=vae_model, image=images, quality_clip=encoder,
                           prompt=PROMPT, negative_prompt="", seed=0, emphasis=1.1, **SAMPLING, **gated)
    refined, mask = out.result[0], out.result[1]
    assert refined.dtype == images.dtype and torch.equal(refined, images)
    assert mask.shape == (2, SIZE, SIZE) and not bool(mask.any())


# -- what stage 1 keeps, per-image masks and strengths -----------------------------------------------------------------
def test_masked_stage_keeps_the_latent_outside_each_mask_bit_identical(comfy_harness, loaded):
    """Image 0: left half at strength 0.7; image 1: top half at 0.4; image 2: skipped. Then stage 2 skips image 1."""
    model, clip, vae, images = loaded
    batch = torch.cat([images, images[:1]])  # (3, 64, 64, 3)
    left, top = torch.zeros(SIZE, SIZE), torch.zeros(SIZE, SIZE)
    left[:, : SIZE // 2] = 1.0
    top[: SIZE // 2 - 8] = 1.0  # rows 0..23 -> latent rows 0..2
    plans = [hand_plan(left, 0.7), hand_plan(top, 0.4, skip_stage2=True), hand_plan(left, 0.7, skip_stage1=True)]
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    masked = comfy_harness.node_class("RefineryMaskedRedenoise")
    global_stage = comfy_harness.node_class("RefineryGlobalRedenoise")
    with torch.inference_mode():
        latent = {"samples": vae.encode(batch)}
        before = latent["samples"].clone()
        after = masked.execute(model=model, positive=positive, negative=negative, latent=latent, plan=plans,
                               seed=5, pixels_per_latent=8, **SAMPLING).result[0]["samples"]
        final = global_stage.execute(model=model, positive=positive, negative=negative, latent={"samples": after},
                                     plan=plans, seed=6, **SAMPLING).result[0]["samples"]

    assert torch.equal(latent["samples"], before), "the input latent is not modified in place"
    assert after.shape == before.shape == (3, 4, 8, 8)
    # outside each mask: bit for bit; inside: changed everywhere
    assert torch.equal(after[0, :, :, 4:], before[0, :, :, 4:])
    assert not torch.isclose(after[0, :, :, :4], before[0, :, :, :4]).all(dim=0).any()
    assert torch.equal(after[1, :, 3:], before[1, :, 3:])
    assert not torch.isclose(after[1, :, :3], before[1, :, :3]).all(dim=0).any()
    assert torch.equal(after[2], before[2]), "a plan that skips stage 1 passes its latent through"
    # different strengths: image 0 (0.7) moves further from its input than image 1 (0.4) inside its mask
    assert (after[0, :, :, :4] - before[0, :, :, :4]).abs().mean() > (after[1, :, :3] - before[1, :, :3]).abs().mean()
    # stage 2: the whole latent changes, except for the image the plan returns untouched
    assert torch.equal(final[1], after[1])
    for index in (0, 2):
        assert not torch.isclose(final[index], after[index]).all(dim=0).any()


def test_soft_mask_mode_fades_across_the_feathered_edge_and_keeps_the_rest(comfy_harness, loaded):
    """Binary mask: pixel columns 0-15 (latent columns 0-1); feathered with sigma 8 px, the latent columns' largest
    values are 1, 1, 0.99, 0.53, 0.10, 0.0076 (>= 1/255), 0.0002 (-> 0), 0. Differential Diffusion (4 steps) changes
    columns 0-5 only, the faint column 5 less than the core; binary mode changes columns 0-1 only."""
    from comfyui_refinery.core.masks import feather

    model, clip, vae, images = loaded
    binary = torch.zeros(SIZE, SIZE)
    binary[:, :16] = 1.0
    soft = feather(binary[None], 8.0)[0]
    plans = [hand_plan(binary, 0.8, steps=(4, 1), feathered=soft)]
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    masked = comfy_harness.node_class("RefineryMaskedRedenoise")
    with torch.inference_mode():
        before = vae.encode(images[:1])
        run = {mode: masked.execute(model=model, positive=positive, negative=positive, latent={"samples": before},
                                    plan=plans, seed=2, pixels_per_latent=8, mask_mode=mode,
                                    **SAMPLING).result[0]["samples"]
               for mode in ("binary", "soft")}

    assert torch.equal(run["binary"][..., 2:], before[..., 2:])
    assert torch.equal(run["soft"][..., 6:], before[..., 6:]), "outside the soft latent mask: bit for bit"
    change = (run["soft"] - before).abs().mean(dim=(0, 1, 2))  # (8,) per latent column
    assert (change[:6] > 0).all(), change
    assert change[5] < change[0] / 2, f"the faint edge column changes less than the core: {change}"
    assert not torch.equal(run["soft"], run["binary"])
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        masked.execute(model=model, positive=positive, negative=positive, latent={"samples": before}, plan=plans,
                       seed=2, pixels_per_latent=8, mask_mode="fuzzy", **SAMPLING)


# -- documented edge cases -------------------------------------------------------------------------------------------
def run_solid_plan_stage(comfy_harness, loaded, perceptual: float, alignment: float):
    """The plan node on constant maps, then stage 1 (direct calls): (plan summary, latent before, latent after)."""
    model, clip, vae, images = loaded
    plan_node = comfy_harness.node_class("RefineryRefinePlan")
    masked = comfy_harness.node_class("RefineryMaskedRedenoise")
    knobs = {name: [value] for name, value in (KNOBS | dict(threshold=0.5)).items()}
    with torch.inference_mode():
        plan_out = plan_node.execute(perceptual_map=[torch.full((1, SIZE, SIZE), perceptual)], perceptual_score=[0.2],
                                     alignment_map=[torch.full((1, SIZE, SIZE), alignment)], alignment_score=[0.1],
                                     prompt=[PROMPT], **knobs)
        plans, summary = plan_out.result[0], plan_out.result[3]
        before = vae.encode(images[:1])
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        after = masked.execute(model=model, positive=positive, negative=positive, latent={"samples": before},
                               plan=plans, seed=0, pixels_per_latent=8, **SAMPLING).result[0]["samples"]
    return summary, before, after


def test_all_zero_mask_skips_stage_one(comfy_harness, sd15_models, pictures, loaded):
    summary, before, after = run_solid_plan_stage(comfy_harness, loaded, perceptual=1.0, alignment=0.0)
    assert "image 0: empty mask" in summary and "stage 1: skipped" in summary and "stage 2: strength" in summary
    assert torch.equal(after, before)
    good_prompt_still_runs(comfy_harness, sd15_models, pictures)


def test_all_one_mask_redenoises_the_whole_image_at_stage_one_strength(comfy_harness, sd15_models, pictures, loaded):
    summary, before, after = run_solid_plan_stage(comfy_harness, loaded, perceptual=0.0, alignment=1.0)
    assert "stage 1: strength 0.725, 1 steps on 100.0% of the pixels" in summary  # 0.8 - 0.5 * (0.2 + 0.1) / 2
    assert not torch.isclose(after, before).all(dim=1).any(), "every latent cell is re-denoised"
    good_prompt_still_runs(comfy_harness, sd15_models, pictures)


# -- bad inputs ----------------------------------------------------------------------------------------------------
def test_plan_mask_and_latent_of_different_sizes_fail_then_recover(comfy_harness, sd15_models, pictures):
    graph = graph_builder()
    unet, clip, vae = add_models(graph, sd15_models)
    plan = add_solid_plan(graph, 0.2, 0.0)  # 64x64 masks
    latent = graph.node("VAEEncode", pixels=graph.node("LoadImage", image="picture.png").out(0), vae=vae.out(0))
    message = stage_failure(comfy_harness, graph, "RefineryMaskedRedenoise", unet, clip, latent, plan,
                            pixels_per_latent=8)
    assert "64x64 pixels" in message and "6x8 cells" in message and "same image you VAE-encode" in message
    good_prompt_still_runs(comfy_harness, sd15_models, pictures)


def test_plan_count_and_latent_batch_mismatch_fails_then_recovers(comfy_harness, sd15_models, pictures):
    graph = graph_builder()
    unet, clip, vae = add_models(graph, sd15_models)
    image = add_images(graph, pictures)  # 2 images
    _, pq, aq = add_maps(graph, image)
    plan = add_plan(graph, pq, aq)
    three = graph.node("RepeatImageBatch", image=graph.node("LoadImage", image=pictures[0]).out(0), amount=3)
    latent = graph.node("VAEEncode", pixels=three.out(0), vae=vae.out(0))
    message = stage_failure(comfy_harness, graph, "RefineryGlobalRedenoise", unet, clip, latent, plan)
    assert "covers 2 images" in message and "batch of 3" in message
    good_prompt_still_runs(comfy_harness, sd15_models, pictures)


def test_zero_steps_is_refused_by_validation_then_recovers(comfy_harness, sd15_models, pictures):
    graph = graph_builder()
    plan = add_solid_plan(graph, 0.2, 0.0, total_steps=0)
    graph.node("PreviewAny", source=plan.out(3))
    result = comfy_harness.run_graph(graph)
    assert not result.success and result.validation_error is not None
    assert plan.id in result.node_errors and "total_steps" in result.error_text()
    good_prompt_still_runs(comfy_harness, sd15_models, pictures)


def test_latent_of_another_model_family_fails_then_recovers(comfy_harness, sd15_models, pictures):
    """A 16-channel (SD3/Flux) latent for an SD1.5 model: the VAE does not match the model."""
    graph = graph_builder()
    unet, clip, vae = add_models(graph, sd15_models)
    latent = graph.node("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1)
    message = stage_failure(comfy_harness, graph, "RefineryMaskedRedenoise", unet, clip, latent,
                            add_solid_plan(graph, 0.2, 0.0), pixels_per_latent=8)
    assert "16 channels" in message and "4-channel" in message and "VAE does not belong" in message
    good_prompt_still_runs(comfy_harness, sd15_models, pictures)


def test_latent_with_a_noise_mask_is_refused_then_recovers(comfy_harness, sd15_models, pictures):
    graph = graph_builder()
    unet, clip, vae = add_models(graph, sd15_models)
    image = add_images(graph, pictures[:1])
    latent = graph.node("VAEEncode", pixels=image.out(0), vae=vae.out(0))
    masked_latent = graph.node("SetLatentNoiseMask", samples=latent.out(0),
                               mask=graph.node("SolidMask", value=1.0, width=SIZE, height=SIZE).out(0))
    message = stage_failure(comfy_harness, graph, "RefineryMaskedRedenoise", unet, clip, masked_latent,
                            add_solid_plan(graph, 0.2, 0.0), pixels_per_latent=8)
    assert "noise_mask" in message and "plain VAEEncode" in message
    good_prompt_still_runs(comfy_harness, sd15_models, pictures)


def test_all_in_one_pads_a_17x3_picture_and_returns_it_at_its_own_size(comfy_harness, sd15_models, pictures):
    """Sides that are not multiples of the VAE factor (an ordinary photo's) used to be refused: the picture is padded
    for sampling (replicated here: 3 rows are too few to mirror 5) and cropped back; the mask keeps its size too."""
    graph = graph_builder()
    unet, clip, vae = add_models(graph, sd15_models)
    image = graph.node("ImageCrop", image=graph.node("LoadImage", image=pictures[0]).out(0), width=17, height=3,
                       x=5, y=20)
    quality = graph.node("RefineryQualityModelLoader", checkpoint="tiny-vit.safetensors", architecture="auto",
                         surgery_depth=0)
    refine = graph.node("RefineryGRefine", model=unet.out(0), clip=clip.out(0), vae=vae.out(0), image=image.out(0),
                        quality_clip=quality.out(0), prompt=PROMPT, negative_prompt="", seed=0, emphasis=1.1,
                        **SAMPLING, **KNOBS, **GUARD_OFF)
    save = graph.node("SaveImage", images=refine.out(0), filename_prefix="odd_17x3")
    mask_save = add_mask_save(graph, refine.out(1), "odd_17x3_mask")

    result = comfy_harness.run_graph(graph)

    assert_ok(result)
    (refined,) = saved_pixels(comfy_harness, result, save)
    assert refined.shape == (3, 17, 3)
    assert not np.array_equal(refined, input_pixels(comfy_harness, pictures[0])[20:23, 5:22]), "it was refined"
    assert [mask.shape for mask in saved_pixels(comfy_harness, result, mask_save)] == [(3, 17, 3)]
    assert "stage 1: strength" in result.outputs[refine.id]["text"][0]


def test_all_in_one_pads_a_mirrored_61x45_picture_and_crops_it_back(comfy_harness, loaded):
    """Padding by mirroring (3 rows and 3 columns to 64x48): picture, mask and plan keep 45x61 (H x W), and the
    refined pixels come from the sampled latent (they differ from the input everywhere stage 1 ran)."""
    from comfyui_refinery.core.clip_surgery import load_quality_clip

    model, clip_model, vae_model, images = loaded
    picture = images[:, 7:52, 2:63]  # (2, 45, 61, 3)
    encoder = load_quality_clip(str(comfy_harness.models_dir / "quality_clip" / "tiny-vit.safetensors"), "auto")
    node = comfy_harness.node_class("RefineryGRefine")
    with torch.inference_mode():
        refined, mask, summary, plans = node.execute(
            model=model, clip=clip_model, vae=vae_model, image=picture, quality_clip=encoder, prompt=PROMPT,
            negative_prompt="", seed=0, emphasis=1.1, **SAMPLING, **(KNOBS | dict(global_strength=0.0)),
            **GUARD_OFF).result[:4]
    assert refined.shape == picture.shape and mask.shape == (2, 45, 61) and bool(mask.all()), summary
    assert all(plan.binary_mask.shape == (45, 61) for plan in plans)
    assert ((refined - picture).abs().flatten(1).mean(1) > 1e-3).all(), "both pictures were refined"


def test_all_in_one_takes_a_1001x777_picture_and_returns_it_at_its_own_size(comfy_harness, loaded):
    """A photo-sized picture goes through maps, plan and the padded latent masks at 777x1001 (H x W) and comes back
    at that size: untouched (bit-identical) when it passes the gate or its mask is empty. (Sampling it would need
    the UNet's attention over 126x98 latent cells, more than 10 GB on a CPU: the sampled crop is checked on 17x3
    and 61x45 pictures.)"""
    from comfyui_refinery.core.clip_surgery import load_quality_clip

    model, clip_model, vae_model, images = loaded
    # (1, 64, 64, 3) -> (1, 777, 1001, 3), real content everywhere
    photo = torch.nn.functional.interpolate(images[:1].movedim(-1, 1), size=(777, 1001), mode="bilinear",
                                            align_corners=False).movedim(1, -1).clamp(0, 1)
    encoder = load_quality_clip(str(comfy_harness.models_dir / "quality_clip" / "tiny-vit.safetensors"), "auto")
    node = comfy_harness.node_class("RefineryGRefine")
    arguments = dict(model=model, clip=clip_model, vae=vae_model, image=photo, quality_clip=encoder, prompt=PROMPT,
                     negative_prompt="", seed=0, emphasis=1.1, **SAMPLING)
    for knobs in (dict(perceptual_gate=0.0, alignment_gate=-1.0), dict(threshold=1.0, global_strength=0.0)):
        with torch.inference_mode():
            refined, mask, summary, plans = node.execute(**arguments, **(KNOBS | knobs)).result[:4]
        assert torch.equal(refined, photo), summary
        assert mask.shape == (1, 777, 1001) and plans[0].feathered_mask.shape == (777, 1001)


def test_padding_mirrors_where_it_can_and_keeps_the_picture(comfy_harness):
    from comfyui_refinery.nodes.comfy_io import pad_to_multiple

    picture = torch.rand(2, 777, 1001, 3)
    padded = pad_to_multiple(picture, 8)
    assert padded.shape == (2, 784, 1008, 3) and torch.equal(padded[:, :777, :1001], picture)
    assert torch.equal(padded[:, 777:, :1001], picture[:, 769:776].flip(1))  # rows 775, 774 ... 769 mirrored
    small = torch.rand(1, 3, 17)  # a MASK too small to mirror 5 rows: the edge repeats
    padded_mask = pad_to_multiple(small, 8)
    assert padded_mask.shape == (1, 8, 24) and torch.equal(padded_mask[:, :3, :17], small)
    assert torch.equal(padded_mask[:, 3:, :17], small[:, 2:3].expand(1, 5, 17))
    assert pad_to_multiple(padded, 8) is padded  # already multiples: nothing to do


def test_plan_node_refuses_bad_knobs_and_list_lengths(comfy_harness, sd15_models, pictures):
    """Direct calls (the schema already bounds the widgets): strengths outside [0, 1], min above max, prompts or
    scores for another batch size."""
    node = comfy_harness.node_class("RefineryRefinePlan")
    maps = dict(perceptual_map=[torch.full((2, 16, 16), 0.2)], alignment_map=[torch.zeros(2, 16, 16)])
    good = dict(perceptual_score=[0.2, 0.4], alignment_score=[0.1], prompt=[PROMPT])
    knobs = {name: [value] for name, value in KNOBS.items()}
    with pytest.raises(ValueError, match=r"strength_max must be in \[0, 1\], got 1.5"):
        node.execute(**maps, **good, **(knobs | {"strength_max": [1.5]}))
    with pytest.raises(ValueError, match="strength_min .* is above strength_max"):
        node.execute(**maps, **good, **(knobs | {"strength_min": [0.9]}))
    with pytest.raises(ValueError, match="'prompt' has 3 values for a batch of 2"):
        node.execute(**maps, **(good | {"prompt": ["a", "b", "c"]}), **knobs)
    with pytest.raises(ValueError, match="'perceptual_score' has 3 values for a batch of 2"):
        node.execute(**maps, **(good | {"perceptual_score": [0.1, 0.2, 0.3]}), **knobs)
    plans, binary, feathered, summary = node.execute(**maps, **good, **knobs).result
    assert len(plans) == 2 and binary.shape == feathered.shape == (2, 16, 16)
    assert plans[0].stage1_strength != plans[1].stage1_strength, "each image gets its own strength"
    good_prompt_still_runs(comfy_harness, sd15_models, pictures)


# -- progress and interruption ---------------------------------------------------------------------------------------
class ProgressRecorder:
    """The browser end of ComfyUI's progress hook: records (value, total, node id); may raise the interrupt flag."""

    def __init__(self, interrupt: bool = False):
        self.updates: list[tuple[int, int, str]] = []
        self.interrupt = interrupt

    def __call__(self, value, total, preview, node_id=None):
        import comfy.model_management
        from comfy_execution.utils import get_executing_context

        if node_id is None and get_executing_context() is not None:
            node_id = get_executing_context().node_id
        self.updates.append((value, total, node_id))
        if self.interrupt:
            comfy.model_management.interrupt_current_processing(True)


def run_all_in_one_with_hook(harness, sd15_models, pictures, recorder, seed, **knobs):
    import comfy.utils

    graph = graph_builder()
    unet, clip, vae = add_models(graph, sd15_models)
    image = add_images(graph, pictures[:1])
    quality = graph.node("RefineryQualityModelLoader", checkpoint="tiny-vit.safetensors", architecture="auto",
                         surgery_depth=0)
    refine = graph.node("RefineryGRefine", model=unet.out(0), clip=clip.out(0), vae=vae.out(0), image=image.out(0),
                        quality_clip=quality.out(0), prompt=PROMPT, negative_prompt="", seed=seed, emphasis=1.1,
                        **SAMPLING, **(KNOBS | knobs | GUARD_OFF))
    graph.node("SaveImage", images=refine.out(0), filename_prefix=f"progress_{seed}")
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(recorder)
    try:
        return harness.run_graph(graph), refine
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)


def test_one_progress_bar_runs_across_both_stages(comfy_harness, sd15_models, pictures):
    recorder = ProgressRecorder()
    result, refine = run_all_in_one_with_hook(comfy_harness, sd15_models, pictures, recorder, seed=11,
                                              total_steps=3, stage1_share=0.67)
    assert_ok(result)
    ours = [(value, total) for value, total, node in recorder.updates if node == refine.id]
    assert ours and {total for _, total in ours} == {3}, ours  # 2 steps of stage 1 + 1 of stage 2, one bar
    values = [value for value, _ in ours]
    assert values == sorted(values) and {1, 2, 3} <= set(values)


def test_interrupt_stops_the_refiner_and_the_queue_goes_on(comfy_harness, sd15_models, pictures):
    import comfy.model_management

    recorder = ProgressRecorder(interrupt=True)
    try:
        result, refine = run_all_in_one_with_hook(comfy_harness, sd15_models, pictures, recorder, seed=12,
                                                  total_steps=4)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not result.success
    assert result.events("execution_interrupted"), result.messages
    assert [value for value, _, node in recorder.updates if node == refine.id] == [1], "stopped after one step"
    good_prompt_still_runs(comfy_harness, sd15_models, pictures)
