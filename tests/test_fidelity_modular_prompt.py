"""eq. 7 on the modular path: the stage helpers (nodes/sampling.py) condition each image on its plan's emphasized
prompt, encoded with the CLIP as CLIPTextEncode would, instead of one conditioning typed for the whole batch.

Random SD1.5-shaped weights inside a real ComfyUI (CPU, 64x64, 1 step): the checks compare conditionings and
latents, never how a picture looks."""

from __future__ import annotations

import gc
import importlib
import sys

import pytest
import torch

from comfyui_refinery.core.aq_map import emphasize_prompt
from comfyui_refinery.core.refine_plan import ImagePlan

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]  # sample on one thread (2-core machine)

SIZE = 64
PROMPT = "a red circle next to a blue square"
EMPHASIZED = emphasize_prompt(PROMPT, ["a blue square"])  # what the AQ-Map gives when the square is missing
SAMPLING = dict(sampler_name="euler", scheduler="normal", cfg=2.0)


@pytest.fixture(scope="module")
def sampling(comfy_harness):
    """nodes/sampling.py as ComfyUI loaded it."""
    node = comfy_harness.node_class("RefineryMaskedRedenoise")
    return importlib.import_module(sys.modules[node.__module__].__package__ + ".sampling")


@pytest.fixture(scope="module")
def models(comfy_harness, sd15_models):
    import nodes

    model = nodes.UNETLoader().load_unet(sd15_models["unet"], "default")[0]
    clip = nodes.CLIPLoader().load_clip(sd15_models["text_encoders"], "stable_diffusion")[0]
    vae = nodes.VAELoader().load_vae(sd15_models["vae"])[0]
    yield model, clip, vae
    del model, clip, vae
    gc.collect()  # ComfyUI holds loaded models by weak reference: free this module's copy for the next test file


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def plan(prompt: str) -> ImagePlan:
    mask = torch.zeros(SIZE, SIZE)
    mask[:, : SIZE // 2] = 1.0
    return ImagePlan(skip_stage1=False, skip_stage2=False, stage1_strength=0.7, stage2_strength=0.5, stage1_steps=1,
                     stage2_steps=1, binary_mask=mask, feathered_mask=mask, prompt=prompt, reason="hand-made")


def test_plan_conditioning_encodes_the_emphasized_prompt(sampling, models):
    _, clip, _ = models
    assert EMPHASIZED == "a red circle next to a blue square, (a blue square:1.1)"
    conditioning_for = sampling.plan_conditioning(clip)
    positive, negative = conditioning_for(EMPHASIZED)
    assert torch.equal(positive[0][0], encode(clip, EMPHASIZED)[0][0])  # as CLIPTextEncode makes it
    assert not torch.equal(positive[0][0], encode(clip, PROMPT)[0][0])  # the emphasis changes the conditioning
    assert torch.equal(negative[0][0], encode(clip, "")[0][0])
    assert conditioning_for(EMPHASIZED)[0] is positive  # each distinct prompt is encoded once

    typed = encode(clip, "a typed prompt")
    fixed = sampling.plan_conditioning(clip, positive=typed, negative=typed)
    assert fixed(EMPHASIZED) == (typed, typed)  # a connected positive overrides the plan's prompt
    assert sampling.plan_conditioning(None, positive=typed, negative=typed)(EMPHASIZED) == (typed, typed)
    with pytest.raises(ValueError, match="No CLIP and no positive conditioning: connect a CLIP"):
        sampling.plan_conditioning(None, negative=typed)
    with pytest.raises(ValueError, match="No CLIP and no positive or negative conditioning"):
        sampling.plan_conditioning(None)


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_samples_each_image_with_its_plans_emphasized_prompt(sampling, models, stage):
    """Two images, one plan prompt each: the stage's result for each image is what a run conditioned on that image's
    emphasized prompt gives, bit for bit, and differs from a run on the plain prompt."""
    model, clip, vae = models
    plans = [plan(EMPHASIZED), plan(PROMPT)]
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        samples = vae.encode(torch.rand(2, SIZE, SIZE, 3, generator=generator))  # (2, 4, 8, 8)
        masks = sampling.stage_masks(plans, (SIZE // 8, SIZE // 8), 8) if stage == 1 else None
        negative = encode(clip, "")

        def run(conditioning_for):
            progress = sampling.StageProgress(2)
            return sampling.run_stage(model, conditioning_for, samples, plans, stage, 3, progress=progress,
                                      masks=masks, **SAMPLING)

        per_plan = run(sampling.plan_conditioning(clip, negative=negative))
        emphasized = run(lambda _prompt: (encode(clip, EMPHASIZED), negative))
        plain = run(lambda _prompt: (encode(clip, PROMPT), negative))
    assert torch.equal(per_plan[0], emphasized[0])
    assert torch.equal(per_plan[1], plain[1])
    assert not torch.equal(per_plan[0], plain[0]), "the emphasized prompt reached the sampler"


STAGE_NODES = ("RefineryMaskedRedenoise", "RefineryGlobalRedenoise")


@pytest.mark.parametrize("node_id", STAGE_NODES)
def test_stage_nodes_encode_the_plans_prompt_with_a_connected_clip(comfy_harness, models, node_id):
    model, clip, vae = models
    node = comfy_harness.node_class(node_id)
    assert "clip" in node.INPUT_TYPES()["optional"] and "positive" in node.INPUT_TYPES()["optional"]
    plans = [plan(EMPHASIZED)]
    extra = {"pixels_per_latent": 8} if node_id == "RefineryMaskedRedenoise" else {}
    negative = encode(clip, "")
    with torch.inference_mode():
        latent = {"samples": vae.encode(torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(1)))}
        with_clip = node.execute(model=model, clip=clip, negative=negative, latent=latent, plan=plans, seed=4,
                                 **SAMPLING, **extra).result[0]["samples"]
        typed = node.execute(model=model, positive=encode(clip, EMPHASIZED), negative=negative, latent=latent,
                             plan=plans, seed=4, **SAMPLING, **extra).result[0]["samples"]
        plain = node.execute(model=model, positive=encode(clip, PROMPT), negative=negative, latent=latent,
                             plan=plans, seed=4, **SAMPLING, **extra).result[0]["samples"]
    assert torch.equal(with_clip, typed) and not torch.equal(with_clip, plain)
