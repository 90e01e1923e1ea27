"""The diffusers runner of the two-stage refiner on randomly initialised pipelines: the tiny SD pipeline of the toy
world, a full-size SD1.5-shaped one (the cached random weights of ``sd15_checkpoint.py``), a tiny SDXL one and
inpainting checkpoints (9-channel UNets). Masks keep pixels, gated pictures are untouched, each picture gets its own
stage-1 strength, seeds reproduce, bad input is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ci import importorskip

importorskip("diffusers")  # under CI a missing test dependency fails

from comfyui_refinery.benchmarks.toyworld.sd_pipeline import build_pipeline  # noqa: E402
from comfyui_refinery.core.diffusers_refiner import refine_with_pipeline, scheduler_steps, stage_seed  # noqa: E402
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


UNTOUCHED = dict(alignment_gate=0.05, skip_stage2_when_gated=True)  # a = 0.1 passes; gated pictures stay as they are


def make_plans(images, perceptual_scores, settings=RefinerSettings(total_steps=4, mask=MaskSettings())):
    perceptual = torch.ones(images.shape[:3])
    perceptual[:, :, :32] = 0.0  # the left half is poor
    return plan_refinement(perceptual, perceptual_scores, torch.zeros(images.shape[:3]),
                           torch.full((images.shape[0],), 0.1), ["a red circle on a plain black background"],
                           settings)


def test_stage1_keeps_pixels_outside_the_mask_and_gated_pictures_are_untouched(pipeline):
    torch.manual_seed(0)
    images = torch.rand(2, 64, 64, 3)
    plans = make_plans(images, torch.tensor([0.3, 0.95]),
                       RefinerSettings(total_steps=4, mask=MaskSettings(), **UNTOUCHED))
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


STAGE_SEED_0_1_0 = 5836529245451711556  # numpy.random.SeedSequence([0, 1, 0]).generate_state(1, dtype=np.uint64)[0]


def test_stage_seed_is_per_stage_and_picture():
    seeds = {(seed, stage, index): stage_seed(seed, stage, index)
             for seed in range(6) for stage in (1, 2) for index in range(6)}
    assert len(set(seeds.values())) == len(seeds)  # no two (seed, stage, picture) share a seed
    assert stage_seed(0, 2, 0) != stage_seed(0, 1, 1) and stage_seed(0, 2, 0) != stage_seed(1, 1, 0)
    assert all(0 <= value < 2**64 for value in seeds.values())
    assert stage_seed(3, 1, 2) == stage_seed(3, 1, 2)
    # pinned: numpy's SeedSequence is specified, so these are the same on every machine and numpy version
    assert stage_seed(0, 1, 0) == STAGE_SEED_0_1_0
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        stage_seed(0, 3, 0)
    with pytest.raises(ValueError, match="must be >= 0"):
        stage_seed(-1, 1, 0)


def recording_stages(pipe):
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    return (RecordingStage(AutoPipelineForInpainting.from_pipe(pipe)),
            RecordingStage(AutoPipelineForImage2Image.from_pipe(pipe)))


def test_each_stage_and_picture_gets_its_own_generator_seed(pipeline):
    """Before: picture i used seed + i in stage 1 and seed + i + 1 in stage 2, the stage-1 noise of picture i + 1."""
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(8))
    plans = make_plans(images, torch.tensor([0.2, 0.3, 0.4]))
    stage1, stage2 = recording_stages(pipeline)
    refine_with_pipeline(pipeline, images, plans, guidance_scale=2.0, seed=7, progress=False, stage1_pipeline=stage1,
                         stage2_pipeline=stage2)
    first = [call["generator"].initial_seed() for call in stage1.calls]
    second = [call["generator"].initial_seed() for call in stage2.calls]
    assert first == [stage_seed(7, 1, index) for index in range(3)]
    assert second == [stage_seed(7, 2, index) for index in range(3)]
    assert len(set(first + second)) == 6
    assert second[0] != first[1] and second[1] != first[2]


def test_gated_pictures_still_get_stage2_by_default(pipeline):
    """METHODS.md 1.4 and the paper: a picture that passes the gate skips stage 1 only."""
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(9))
    plans = make_plans(images, torch.tensor([0.3, 0.95]), RefinerSettings(total_steps=4, alignment_gate=0.05,
                                                                          mask=MaskSettings()))
    assert plans[1].reason == "passed the quality gate" and plans[1].skip_stage1 and not plans[1].skip_stage2
    stage1, stage2 = recording_stages(pipeline)
    result = refine_with_pipeline(pipeline, images, plans, guidance_scale=2.0, progress=False, stage1_pipeline=stage1,
                                  stage2_pipeline=stage2)
    assert (len(stage1.calls), len(stage2.calls)) == (1, 2)
    assert torch.equal(result.after_stage1[1], images[1])  # no stage 1
    assert not torch.allclose(result.images[1], images[1], atol=1e-4)  # but stage 2
    assert stage2.calls[1]["strength"] == plans[1].stage2_strength


def test_a_plan_that_skips_only_stage2_still_runs_stage1(pipeline):
    """The stages are independent (core ``stage_runs``, as in the ComfyUI nodes); before, the diffusers runner
    returned such a picture untouched."""
    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(10))
    plans = [dataclasses.replace(make_plans(images, torch.tensor([0.3]))[0], skip_stage2=True)]
    stage1, stage2 = recording_stages(pipeline)
    result = refine_with_pipeline(pipeline, images, plans, guidance_scale=2.0, progress=False, stage1_pipeline=stage1,
                                  stage2_pipeline=stage2)
    assert (len(stage1.calls), len(stage2.calls)) == (1, 0)
    assert torch.equal(result.after_stage1[0, :, 32:], images[0, :, 32:])
    assert not torch.allclose(result.after_stage1[0, :, :32], images[0, :, :32], atol=1e-3)
    torch.testing.assert_close(result.images, result.after_stage1.clamp(0, 1))


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared by the tests below.

FEATHERED = MaskSettings(dilation=2, feather_sigma=1.0)  # soft edge that reaches exactly 0 within ~15 px
EULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading",
                "prediction_type": "epsilon"}


class RecordingStage:
    """Wraps a stage pipeline: records each call's keyword arguments and how many UNet evaluations it made."""

    def __init__(self, pipe):
        self.pipe, self.calls, self.unet_calls = pipe, [], []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        with count_unet_calls(self.pipe.unet) as counted:
            output = self.pipe(**kwargs)
        self.calls.append(kwargs)
        self.unet_calls.append(len(counted))
        return output


class count_unet_calls:
    """``with count_unet_calls(unet) as calls:`` -> one entry in ``calls`` per UNet forward pass (one per step)."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __enter__(self):
        self.handle = self.unet.register_forward_hook(lambda *args: self.calls.append(1))
        return self.calls

    def __exit__(self, *exc):
        self.handle.remove()


def assert_stage1_kept_outside_the_mask(result, images, plans, index):
    """After stage 1, picture ``index`` is the input wherever the feathered mask is 0, moves at most by the
    feathered weight elsewhere, and changed inside the binary mask."""
    before, after = images[index], result.after_stage1[index]
    feathered, binary = plans[index].feathered_mask, plans[index].binary_mask > 0.5
    outside = feathered == 0
    assert outside.sum() > 0 and binary.sum() > 0
    assert torch.equal(after[outside], before[outside])
    assert bool(((after - before).abs() <= feathered[..., None] + 1e-6).all())
    assert not torch.allclose(after[binary], before[binary], atol=1e-3)
    assert bool(torch.isfinite(result.images[index]).all())


# ---------------------------------------------------------------------------------------------------------------
# A randomly initialised full-size SD1.5-shaped StableDiffusionPipeline (860M UNet, CLIP-L, SD VAE) in fp32.


def _load_weights(model, path, strip_prefix=""):
    """Load a fp16 safetensors file into ``model`` as fp32 (strict). ``strip_prefix`` is dropped from the file's keys
    when the model's own keys lack it (transformers 5's CLIPTextModel has no ``text_model.`` level)."""
    from safetensors.torch import load_file

    own_keys = model.state_dict().keys()
    state = load_file(str(path))
    if strip_prefix and not any(key.startswith(strip_prefix) for key in own_keys):
        state = {key.removeprefix(strip_prefix): value for key, value in state.items()}
    model.load_state_dict({key: value.float() for key, value in state.items()}, strict=True, assign=True)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    assert not left, f"not loaded: {left[:5]}"
    return model.eval()


@pytest.fixture(scope="module")
def sd15_pipeline(pipeline):
    """The cached random SD1.5 files (built once per machine, ~30 s, by ``sd15_checkpoint.build_sd15``) assembled
    into a fp32 ``StableDiffusionPipeline`` with an Euler scheduler. UNet and VAE are created on the meta device
    (no 860M-parameter random init) and take the file's tensors."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from sd15_checkpoint import CLIP_CONFIG, FILES, UNET_CONFIG, VAE_CONFIG, build_sd15
    from transformers import CLIPTextConfig, CLIPTextModel

    root = build_sd15()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))  # position_ids is a non-persistent buffer: built here
    sd15 = StableDiffusionPipeline(
        vae=_load_weights(vae, root / "vae" / FILES["vae"]),
        text_encoder=_load_weights(text_encoder, root / "text_encoders" / FILES["text_encoders"], "text_model."),
        tokenizer=pipeline.tokenizer, unet=_load_weights(unet, root / "unet" / FILES["unet"]),
        scheduler=EulerDiscreteScheduler(**EULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    assert sd15.vae_scale_factor == 8 and sd15.unet.dtype == torch.float32
    return sd15


def test_sd15_shaped_pipeline_per_picture_strength_masks_gate_and_seed(sd15_pipeline):
    from diffusers import AutoPipelineForInpainting

    generator = torch.Generator().manual_seed(1)
    images = torch.rand(3, 64, 64, 3, generator=generator)
    settings = RefinerSettings(total_steps=3, mask=FEATHERED, **UNTOUCHED)  # (n1, n2) = (2, 1)
    plans = make_plans(images, torch.tensor([0.2, 0.7, 0.95]), settings)
    assert [plan.reason for plan in plans] == ["refine", "refine", "passed the quality gate"]
    assert (plans[0].stage1_steps, plans[0].stage2_steps) == (2, 1)
    strengths = [plans[0].stage1_strength, plans[1].stage1_strength]
    assert strengths[0] > strengths[1]  # the poorer picture is re-denoised harder

    stage1 = RecordingStage(AutoPipelineForInpainting.from_pipe(sd15_pipeline))
    with count_unet_calls(sd15_pipeline.unet) as unet_calls:
        result = refine_with_pipeline(sd15_pipeline, images, plans, guidance_scale=2.0, seed=3, progress=False,
                                      stage1_pipeline=stage1)
    assert [call["strength"] for call in stage1.calls] == strengths  # each picture its own strength
    assert stage1.unet_calls == [2, 2]  # n1 steps each, whatever the strength
    assert len(unet_calls) == 2 * (2 + 1)  # so stage 2 ran its n2 = 1 step on each refined picture
    for index in (0, 1):
        assert_stage1_kept_outside_the_mask(result, images, plans, index)
        assert not torch.allclose(result.images[index], result.after_stage1[index], atol=1e-4)  # stage 2 ran
    assert torch.equal(result.images[2], images[2]) and torch.equal(result.after_stage1[2], images[2])

    again = refine_with_pipeline(sd15_pipeline, images[:1], plans[:1], guidance_scale=2.0, seed=3, progress=False)
    torch.testing.assert_close(again.after_stage1[0], result.after_stage1[0])  # same seed, same picture
    torch.testing.assert_close(again.images[0], result.images[0])


# ---------------------------------------------------------------------------------------------------------------
# A tiny randomly initialised SDXL pipeline (two text encoders, text_time added conditioning).


def build_sdxl_pipeline(tokenizer, unet_in_channels=4, seed=0):
    """A tiny ``StableDiffusionXLPipeline`` (or, with ``unet_in_channels=9``, ``StableDiffusionXLInpaintPipeline``,
    an SDXL inpainting checkpoint) on 64x64 pictures: 4x VAE, two 32-wide CLIP towers whose hidden states
    concatenate to the UNet's 64-wide context, and the text_time embedding of the 6 size/crop ids (8 each) plus
    the second tower's 32-wide pooled projection."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=77, projection_dim=32)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=unet_in_channels, out_channels=4, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=16,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), norm_num_groups=8,
    )
    pipeline_class = StableDiffusionXLPipeline if unet_in_channels == 4 else StableDiffusionXLInpaintPipeline
    return pipeline_class(
        vae=vae, text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(**EULER_CONFIG),
    )


def test_tiny_sdxl_pipeline_runs_both_stages(pipeline):
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    sdxl = build_sdxl_pipeline(pipeline.tokenizer)
    assert type(AutoPipelineForInpainting.from_pipe(sdxl)).__name__ == "StableDiffusionXLInpaintPipeline"
    assert type(AutoPipelineForImage2Image.from_pipe(sdxl)).__name__ == "StableDiffusionXLImg2ImgPipeline"
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    plans = make_plans(images, torch.tensor([0.3, 0.95]),
                       RefinerSettings(total_steps=4, mask=FEATHERED, **UNTOUCHED))
    with count_unet_calls(sdxl.unet) as unet_calls:
        result = refine_with_pipeline(sdxl, images, plans, guidance_scale=2.0, progress=False)
    assert len(unet_calls) == 2 + 2  # one picture refined: n1 + n2 steps
    assert_stage1_kept_outside_the_mask(result, images, plans, 0)
    assert not torch.allclose(result.images[0], result.after_stage1[0], atol=1e-4)  # stage 2 ran
    assert torch.equal(result.images[1], images[1])  # passed the gate: bit-identical

    inpainting = build_sdxl_pipeline(pipeline.tokenizer, unet_in_channels=9, seed=1)  # an SDXL inpainting checkpoint
    result = refine_with_pipeline(inpainting, images, plans, guidance_scale=2.0, progress=False)
    assert_stage1_kept_outside_the_mask(result, images, plans, 0)
    assert torch.equal(result.images[1], images[1])


# ---------------------------------------------------------------------------------------------------------------
# Inpainting checkpoints (9-channel UNets: latents + mask + masked-image latents) and the other pipeline variants.


@pytest.fixture(scope="module")
def inpainting_pipeline(pipeline):
    """A tiny ``StableDiffusionInpaintPipeline`` with a random 9-channel UNet of the toy UNet's shape, sharing the
    toy pipeline's VAE, text encoder, tokenizer and scheduler."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    torch.manual_seed(5)
    unet = UNet2DConditionModel.from_config(pipeline.unet.config, in_channels=9)
    return StableDiffusionInpaintPipeline(**{**pipeline.components, "unet": unet}, requires_safety_checker=False)


def test_inpainting_checkpoint_as_stage1_keeps_pixels_outside_the_feathered_mask(pipeline, inpainting_pipeline):
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    plans = make_plans(images, torch.tensor([0.3, 0.95]),
                       RefinerSettings(total_steps=4, mask=FEATHERED, **UNTOUCHED))
    with count_unet_calls(inpainting_pipeline.unet) as stage1_calls, count_unet_calls(pipeline.unet) as stage2_calls:
        result = refine_with_pipeline(pipeline, images, plans, guidance_scale=2.0, progress=False,
                                      stage1_pipeline=inpainting_pipeline)
    assert (len(stage1_calls), len(stage2_calls)) == (2, 2)  # stage 1 on the 9-channel UNet, stage 2 on the base
    assert_stage1_kept_outside_the_mask(result, images, plans, 0)
    assert not torch.allclose(result.images[0], result.after_stage1[0], atol=1e-4)
    assert torch.equal(result.images[1], images[1])


def test_inpainting_checkpoint_as_the_pipeline_runs_stage2_on_the_whole_picture(inpainting_pipeline):
    """diffusers' img2img pipelines cannot feed a 9-channel UNet: stage 2 inpaints with an all-ones mask."""
    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(6))
    plans = make_plans(images, torch.tensor([0.3]), RefinerSettings(total_steps=4, mask=FEATHERED))
    with count_unet_calls(inpainting_pipeline.unet) as unet_calls:
        result = refine_with_pipeline(inpainting_pipeline, images, plans, guidance_scale=2.0, progress=False)
    assert len(unet_calls) == 2 + 2
    assert_stage1_kept_outside_the_mask(result, images, plans, 0)
    outside = plans[0].feathered_mask == 0
    assert not torch.allclose(result.images[0][outside], images[0][outside], atol=1e-4)  # stage 2 is global


@pytest.mark.parametrize("variant", ["StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"])
def test_img2img_and_inpaint_variants_give_the_text_to_image_pipelines_result(pipeline, variant):
    import diffusers

    other = getattr(diffusers, variant).from_pipe(pipeline)
    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(7))
    plans = make_plans(images, torch.tensor([0.3]), RefinerSettings(total_steps=4, mask=FEATHERED))
    expected = refine_with_pipeline(pipeline, images, plans, guidance_scale=2.0, progress=False)
    got = refine_with_pipeline(other, images, plans, guidance_scale=2.0, progress=False)
    torch.testing.assert_close(got.images, expected.images)
    torch.testing.assert_close(got.after_stage1, expected.after_stage1)



def brightness_scorer(originals: torch.Tensor, weight: float, seen: list | None = None):
    """A guard scorer whose p is ``0.5 + weight * change``, change = how far a picture's mean moved from its input's
    (a fixed a): the guard's decisions follow from the pixels alone. seen: collects every batch scored."""
    from comfyui_refinery.core.keep_better import GuardScores

    def score(pictures: torch.Tensor) -> GuardScores:
        if seen is not None:
            seen.append(pictures.clone())
        moved = (pictures.mean(dim=(1, 2, 3)) - originals.mean(dim=(1, 2, 3))).abs()
        return GuardScores(0.5 + weight * moved, torch.full_like(moved, 0.5))

    return score


def test_guard_returns_the_input_bit_identical_unless_the_refined_picture_scores_better(pipeline):
    torch.manual_seed(1)
    images = torch.rand(2, 64, 64, 3)
    plans = make_plans(images, torch.tensor([0.3, 0.3]))
    plain = refine_with_pipeline(pipeline, images, plans, guidance_scale=2.0, progress=False)
    worse = refine_with_pipeline(pipeline, images, plans, guidance_scale=2.0, progress=False,
                                 guard=brightness_scorer(images, weight=-1.0))  # any change lowers p
    assert not worse.decision.keep.any() and torch.equal(worse.images, images)
    assert torch.equal(worse.after_stage1, images) and worse.table.count("input kept (not better)") == 2
    better = refine_with_pipeline(pipeline, images, plans, guidance_scale=2.0, progress=False,
                                  guard=brightness_scorer(images, weight=1e3))  # any change is a large gain
    assert better.decision.keep.all() and torch.equal(better.images, plain.images)
    assert better.decision.attempt.tolist() == [0, 0]


def test_guard_keeps_the_best_passing_attempt_with_its_own_seeds(pipeline):
    torch.manual_seed(2)
    images = torch.rand(2, 64, 64, 3)
    plans = make_plans(images, torch.tensor([0.3, 0.3]))
    seen: list[torch.Tensor] = []
    result = refine_with_pipeline(pipeline, images, plans, guidance_scale=2.0, progress=False, attempts=2,
                                  guard=brightness_scorer(images, weight=1e3, seen=seen))
    _, first, second = seen  # the inputs, then each attempt's pictures
    assert not torch.equal(first, second)  # attempt 2 draws other noise
    moved = [(attempt.mean(dim=(1, 2, 3)) - images.mean(dim=(1, 2, 3))).abs() for attempt in (first, second)]
    for index in range(2):
        best = int(moved[1][index] > moved[0][index])
        assert int(result.decision.attempt[index]) == best
        assert torch.equal(result.images[index], (first, second)[best][index])


def test_guard_input_errors(pipeline):
    images = torch.rand(1, 64, 64, 3)
    plans = make_plans(images, torch.tensor([0.3]))
    with pytest.raises(ValueError, match="attempts must be a whole number >= 1, got 0"):
        refine_with_pipeline(pipeline, images, plans, attempts=0, guard=brightness_scorer(images, 1.0))
    with pytest.raises(ValueError, match="attempts is 2 but no guard scores them"):
        refine_with_pipeline(pipeline, images, plans, attempts=2)
