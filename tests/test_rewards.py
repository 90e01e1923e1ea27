"""Reward models (core/rewards): preprocessing against the reference pipelines, the shared interface, each format's
loader on a tiny random model saved in its exact release layout, and the loading errors users see."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from comfyui_refinery.core.rewards import (
    AestheticReward,
    ClipScoreReward,
    HPSv2Reward,
    PickScoreReward,
    TrainedClipReward,
    base,
    detect_reward_kind,
    load_aesthetic,
    load_clip_score,
    load_hpsv2,
    load_pickscore,
    load_reward_model,
    load_trained_reward,
    save_trained_reward,
)
from comfyui_refinery.core.rewards.preprocessing import (
    ImagePreprocess,
    clip_image_processor_preprocess,
    hpsv2_preprocess,
    open_clip_preprocess,
    rgb_pixels,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import TINY_VIT_CONFIG, build_tiny_vit

ARCH = "tiny-reward-vit"
PROMPTS = ["a red circle", "a blue square on a table", "", "two green triangles"]

# Preprocessing tolerance, in normalised units (pixel / std): torch's antialiased bicubic uses PIL's kernel, so the
# only difference left is PIL's uint8 rounding of the resized image (mean about 0.005, max about 0.06 measured).
MEAN_TOLERANCE = 0.01
MAX_TOLERANCE = 0.1


# -- helpers -------------------------------------------------------------------------------------------------------
def smooth_images(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(count, H, W, 3) in [0, 1], uint8-exact (so a PIL copy holds the same pixels), smooth plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, max(2, height // 8), max(2, width // 8), generator=generator)
    pixels = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    pixels = (pixels + 0.05 * torch.randn(count, 3, height, width, generator=generator)).clamp(0, 1)
    return (pixels * 255).round().div(255).permute(0, 2, 3, 1).contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image * 255).round().to(torch.uint8).numpy(), "RGB")


def assert_preprocessing_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    difference = (ours - reference).abs()
    assert difference.mean() < MEAN_TOLERANCE, float(difference.mean())
    assert difference.max() < MAX_TOLERANCE, float(difference.max())


def open_clip_reference(checkpoint: Path):
    """The tiny model as open_clip itself builds and loads it (independent of core/rewards)."""
    from safetensors.torch import load_file

    model = open_clip.create_model(ARCH, pretrained=None)
    model.load_state_dict(load_file(str(checkpoint)))
    return model.eval(), open_clip.get_tokenizer(ARCH)


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """tiny-reward-vit.safetensors with its open_clip config JSON beside it."""
    return build_tiny_vit(tmp_path_factory.mktemp("reward_clip"), ARCH, TINY_VIT_CONFIG, seed=3)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return open_clip_reference(tiny_checkpoint)


@pytest.fixture(scope="module")
def clip_score(tiny_checkpoint) -> ClipScoreReward:
    return load_clip_score(tiny_checkpoint)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return smooth_images(4, 40, 56, seed=1)


# -- preprocessing -------------------------------------------------------------------------------------------------
IMAGE_SIZES = [(64, 48), (37, 100), (300, 200), (20, 20), (15, 40)]


@pytest.mark.parametrize("size", [32, 224])
def test_open_clip_preprocessing_matches_image_transform(size):
    transform = open_clip.image_transform(size, is_train=False)
    ours = open_clip_preprocess(size)
    for index, (height, width) in enumerate(IMAGE_SIZES):
        image = smooth_images(1, height, width, seed=index)
        reference = transform(to_pil(image[0]))[None]
        assert_preprocessing_close(ours(rgb_pixels(image)), reference)


def test_hpsv2_preprocessing_matches_longest_side_and_black_padding():
    # HPSv2's preprocess_val (ResizeMaxSize) is open_clip's resize_mode="longest"
    transform = open_clip.image_transform(32, is_train=False, resize_mode="longest")
    ours = hpsv2_preprocess(32)
    for index, (height, width) in enumerate(IMAGE_SIZES):
        image = smooth_images(1, height, width, seed=10 + index)
        assert_preprocessing_close(ours(rgb_pixels(image)), transform(to_pil(image[0]))[None])
    # a wide image: 64x32 -> 32x16 centred, 8 black rows above and below
    pixels = ours(rgb_pixels(torch.ones(1, 32, 64, 3)))
    black = (0 - torch.tensor(ours.mean)) / torch.tensor(ours.std)
    torch.testing.assert_close(pixels[0, :, :8, 0], black[:, None].expand(3, 8))
    white = (1 - torch.tensor(ours.mean)) / torch.tensor(ours.std)
    torch.testing.assert_close(pixels[0, :, 8:24, :], white[:, None, None].expand(3, 16, 32))


def test_clip_image_processor_preprocessing_matches_transformers():
    import transformers
    from transformers import CLIPImageProcessor

    settings = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    ours = clip_image_processor_preprocess(CLIPImageProcessor(**settings).to_dict())
    processors = [CLIPImageProcessor(**settings)]
    if hasattr(transformers, "CLIPImageProcessorPil"):  # transformers 5: the PIL path PickScore was trained with
        processors.append(transformers.CLIPImageProcessorPil(**settings))
    for index, (height, width) in enumerate(IMAGE_SIZES):
        image = smooth_images(1, height, width, seed=20 + index)
        for processor in processors:
            output = processor(images=to_pil(image[0]), return_tensors="np")
            reference = torch.as_tensor(np.asarray(output["pixel_values"]))
            assert_preprocessing_close(ours(rgb_pixels(image)), reference)


def test_crop_offsets_follow_torchvision_and_transformers():
    # 47 x 32 at size 32: no resize, 15 rows to cut; torchvision rounds 7.5 to 8, transformers floors to 7
    image = smooth_images(1, 47, 32, seed=5)
    open_clip_pixels = open_clip.image_transform(32, is_train=False)(to_pil(image[0]))[None]
    torch.testing.assert_close(open_clip_preprocess(32)(rgb_pixels(image)), open_clip_pixels, atol=1e-5, rtol=0)
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers_pixels = processor(images=to_pil(image[0]), return_tensors="pt")["pixel_values"]
    ours = clip_image_processor_preprocess(processor.to_dict())
    torch.testing.assert_close(ours(rgb_pixels(image)), transformers_pixels, atol=1e-5, rtol=0)
    assert not torch.allclose(open_clip_pixels, transformers_pixels)


def test_preprocessing_is_differentiable():
    images = smooth_images(2, 50, 40).requires_grad_(True)
    for preprocess in (open_clip_preprocess(32), hpsv2_preprocess(32)):
        preprocess(rgb_pixels(images)).square().sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0
        images.grad = None


def test_grayscale_is_replicated_and_rgba_composited_over_white():
    gray = torch.rand(2, 8, 8, 1)
    torch.testing.assert_close(rgb_pixels(gray), gray.permute(0, 3, 1, 2).expand(2, 3, 8, 8))
    rgba = torch.cat([torch.zeros(1, 2, 2, 3), torch.tensor([0.0, 0.25, 1.0, 1.0]).view(1, 2, 2, 1)], dim=-1)
    # black pixels with alpha 0, 0.25, 1, 1 over white -> 1, 0.75, 0, 0
    torch.testing.assert_close(rgb_pixels(rgba)[0, 0], torch.tensor([[1.0, 0.75], [0.0, 0.0]]))


def test_image_layout_errors():
    with pytest.raises(ValueError, match="3 channels"):
        rgb_pixels(torch.rand(1, 8, 8, 2))
    with pytest.raises(ValueError, match="0 images"):
        rgb_pixels(torch.rand(0, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        rgb_pixels(torch.rand(8, 8, 3))
    with pytest.raises(ValueError, match="float"):
        rgb_pixels(torch.zeros(1, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="resize_mode"):
        ImagePreprocess(size=(32, 32), resize_mode="stretch")


# -- the shared interface (on CLIPScore) ---------------------------------------------------------------------------
def test_clip_score_by_hand(clip_score, reference, images):
    model, tokenizer = reference
    with torch.no_grad():
        pixels = open_clip_preprocess(32)(images.permute(0, 3, 1, 2))
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
    cosine = (image * text).sum(dim=-1)
    assert (cosine < 0).any() and (cosine > 0).any()  # both branches of max(cos, 0) are exercised
    expected = 2.5 * cosine.clamp(min=0)  # Hessel et al. 2021: w = 2.5
    scores = clip_score.score(images, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    # through open_clip's own PIL preprocessing the score moves only by the preprocessing tolerance
    with torch.no_grad():
        pil_pixels = torch.stack([open_clip.image_transform(32, is_train=False)(to_pil(image)) for image in images])
        pil_image = F.normalize(model.encode_image(pil_pixels), dim=-1)
    torch.testing.assert_close(scores, 2.5 * (pil_image * text).sum(-1).clamp(min=0), atol=0.02, rtol=0)


def test_clip_score_prompt_prefix(tiny_checkpoint, clip_score, images):
    prefixed = load_clip_score(tiny_checkpoint, prompt_prefix="A photo depicts ", weight=100.0)
    raw = prefixed.score(images, PROMPTS)
    plain = load_clip_score(tiny_checkpoint, weight=100.0).score(images, ["A photo depicts " + p for p in PROMPTS])
    torch.testing.assert_close(raw, plain)


def test_one_prompt_for_all_and_count_errors(clip_score, images):
    torch.testing.assert_close(clip_score.score(images, "a red circle"), clip_score.score(images, ["a red circle"] * 4))
    torch.testing.assert_close(clip_score.score(images, ["a red circle"]), clip_score.score(images, "a red circle"))
    with pytest.raises(ValueError, match="Got 2 prompts for 4 images"):
        clip_score.score(images, PROMPTS[:2])
    with pytest.raises(ValueError, match="0 images"):
        clip_score.score(images[:0], [])
    with pytest.raises(ValueError, match="prompt"):
        clip_score.score(images, None)


def test_chunks_give_the_same_scores(clip_score, images):
    whole = clip_score.score(images, PROMPTS)
    clip_score.batch_size = 3
    try:
        torch.testing.assert_close(clip_score.score(images, PROMPTS), whole, atol=1e-6, rtol=0)
    finally:
        clip_score.batch_size = 16


def test_grayscale_and_rgba_images_score_as_their_rgb(clip_score, images):
    gray = images[..., :1]
    torch.testing.assert_close(clip_score.score(gray, PROMPTS), clip_score.score(gray.expand(-1, -1, -1, 3), PROMPTS))
    opaque = torch.cat([images, torch.ones_like(images[..., :1])], dim=-1)
    torch.testing.assert_close(clip_score.score(opaque, PROMPTS), clip_score.score(images, PROMPTS))


def test_text_features_are_cached_for_a_frozen_model(tiny_checkpoint, images, monkeypatch):
    reward = load_clip_score(tiny_checkpoint)
    embedded = []
    original = reward.encode_prompts
    reward.encode_prompts = lambda prompts: embedded.extend(prompts) or original(prompts)
    first = reward.score(images, ["a", "b", "a", "b"])
    assert sorted(embedded) == ["a", "b"]  # each distinct prompt once
    reward.score(images, ["b", "a", "a", "c"])
    assert sorted(embedded) == ["a", "b", "c"]  # only the new prompt
    torch.testing.assert_close(reward.score(images, ["a", "b", "a", "b"]), first)
    monkeypatch.setattr(base, "TEXT_CACHE_SIZE", 2)  # least recently used prompts leave first
    reward.score(images, ["c", "d", "d", "d"])
    assert list(reward._text_cache) == ["c", "d"]
    reward.to(torch.float64)  # moving or casting empties the cache
    assert len(reward._text_cache) == 0 and reward.dtype == torch.float64
    torch.testing.assert_close(reward.score(images, ["a", "b", "a", "b"]), first, atol=1e-5, rtol=0)
    reward.requires_grad_(True)  # trainable weights: never cached
    embedded.clear()
    reward.score(images, ["a", "a", "a", "a"])
    reward.score(images, ["a", "a", "a", "a"])
    assert embedded == ["a", "a"]


def test_differentiable_scores_reach_images_and_parameters(tiny_checkpoint, images):
    reward = load_clip_score(tiny_checkpoint)
    assert not any(parameter.requires_grad for parameter in reward.parameters())  # loaders return frozen models
    assert not reward.score(images, PROMPTS).requires_grad
    pixels = images.clone().requires_grad_(True)
    reward.score(pixels, PROMPTS, differentiable=True).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    reward.requires_grad_(True)
    reward(images, PROMPTS).sum().backward()  # forward = the differentiable score
    assert reward.model.visual.conv1.weight.grad.abs().sum() > 0
    assert reward.model.token_embedding.weight.grad.abs().sum() > 0
    assert reward.device == torch.device("cpu")


# -- HPSv2 ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hpsv2_file(tmp_path_factory, tiny_checkpoint) -> Path:
    """HPS_v2_compressed.pt in the release layout: torch.save({"state_dict": float16 open_clip state dict})."""
    from safetensors.torch import load_file

    state_dict = {key: value.half() for key, value in load_file(str(tiny_checkpoint)).items()}
    path = tmp_path_factory.mktemp("hpsv2") / "HPS_v2_compressed.pt"
    torch.save({"state_dict": state_dict}, path)
    return path


def test_hpsv2_score_is_the_diagonal_of_normalised_features(hpsv2_file, images):
    reward = load_hpsv2(hpsv2_file, architecture=ARCH)
    assert isinstance(reward, HPSv2Reward) and reward.kind == "hpsv2"
    # HPSv2's score.py: outputs = model(image, text); diag(image_features @ text_features.T)
    model = open_clip.create_model(ARCH, pretrained=None)
    model.load_state_dict(torch.load(hpsv2_file, weights_only=True)["state_dict"])
    tokenizer = open_clip.get_tokenizer(ARCH)
    with torch.no_grad():
        transform = open_clip.image_transform(32, is_train=False, resize_mode="longest")  # = HPSv2 preprocess_val
        pixels = torch.stack([transform(to_pil(image)) for image in images])
        image_features, text_features, _ = model.eval()(pixels, tokenizer(PROMPTS))
        expected = torch.diagonal(image_features @ text_features.T)
        exact_pixels = hpsv2_preprocess(32)(images.permute(0, 3, 1, 2))
        exact_image, _, _ = model(exact_pixels, tokenizer(PROMPTS))
        exact = torch.diagonal(exact_image @ text_features.T)
    scores = reward.score(images, PROMPTS)
    torch.testing.assert_close(scores, exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, expected, atol=0.01, rtol=0)


def test_hpsv2_from_safetensors_and_auto_detection(hpsv2_file, tmp_path, images):
    from_pickle = load_reward_model(hpsv2_file, architecture=ARCH)  # auto: .pt with "state_dict" -> hpsv2
    assert isinstance(from_pickle, HPSv2Reward)
    converted = tmp_path / "HPS_v2.safetensors"
    save_file(torch.load(hpsv2_file, weights_only=True)["state_dict"], str(converted))
    from_safetensors = load_reward_model(converted, kind="hpsv2", architecture=ARCH)
    torch.testing.assert_close(from_safetensors.score(images, PROMPTS), from_pickle.score(images, PROMPTS))
    with pytest.raises(ValueError, match="kind='hpsv2'"):  # a bare open_clip state dict could be either
        load_reward_model(converted, architecture=ARCH)


# -- PickScore -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pickscore_folder(tmp_path_factory) -> Path:
    """A tiny transformers CLIPModel + CLIPProcessor, each saved with save_pretrained into one folder."""
    from comfyui_refinery.benchmarks.toyworld.sd_pipeline import build_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = tmp_path_factory.mktemp("pickscore")
    folder = root / "PickScore_v1"
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=build_tokenizer(root / "bpe"),
    )
    processor.save_pretrained(folder)
    return folder


def _transformers_features(output) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_pickscore_is_logit_scale_times_cosine(pickscore_folder, images):
    from transformers import CLIPModel, CLIPProcessor

    reward = load_pickscore(pickscore_folder)
    assert isinstance(reward, PickScoreReward) and reward.kind == "pickscore"
    # PickScore's README: processor -> get_image_features / get_text_features -> normalise -> logit_scale.exp() * dot
    model = CLIPModel.from_pretrained(pickscore_folder).eval()
    processor = CLIPProcessor.from_pretrained(pickscore_folder)
    with torch.no_grad():
        text_inputs = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = F.normalize(_transformers_features(model.get_text_features(**text_inputs)), dim=-1)
        image_inputs = processor(images=[to_pil(image) for image in images], return_tensors="pt")
        image = F.normalize(_transformers_features(model.get_image_features(**image_inputs)), dim=-1)
        exact_pixels = reward.preprocess(images.permute(0, 3, 1, 2))
        exact_image = F.normalize(_transformers_features(model.get_image_features(pixel_values=exact_pixels)), dim=-1)
    scale = model.logit_scale.exp()
    scores = reward.score(images, PROMPTS)
    torch.testing.assert_close(scores, scale * (exact_image * text).sum(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(scores, scale * (image * text).sum(-1), atol=0.1, rtol=0)  # logit units (x 14.3)
    assert detect_reward_kind(pickscore_folder) == "pickscore"
    assert isinstance(load_reward_model(pickscore_folder), PickScoreReward)


def test_pickscore_processor_in_another_folder(pickscore_folder, tmp_path, images):
    import shutil

    model_only, processor_only = tmp_path / "model", tmp_path / "processor"
    model_only.mkdir(), processor_only.mkdir()
    for path in pickscore_folder.iterdir():
        target = model_only if path.name in ("config.json", "model.safetensors") else processor_only
        shutil.copy(path, target / path.name)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        load_pickscore(model_only)
    reward = load_reward_model(model_only, processor_folder=processor_only)
    torch.testing.assert_close(reward.score(images, PROMPTS), load_pickscore(pickscore_folder).score(images, PROMPTS))


def test_pickscore_folder_errors(pickscore_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json.*model.safetensors"):
        load_reward_model(tmp_path)  # an empty folder: says what a PickScore folder holds
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match="'clip_vision_model' model"):
        load_pickscore(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_pickscore(tmp_path)


# -- aesthetic heads -----------------------------------------------------------------------------------------------
def laion_mlp_head(width: int, seed: int = 0) -> torch.nn.Module:
    """improved-aesthetic-predictor's MLP, written out as in its repository."""
    torch.manual_seed(seed)

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
                torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
            )

    return MLP().eval()


def test_aesthetic_mlp_head_on_normalised_embedding(tiny_checkpoint, reference, images, tmp_path):
    head = laion_mlp_head(TINY_VIT_CONFIG["embed_dim"])
    head_file = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), head_file)
    reward = load_reward_model(head_file, tower=tiny_checkpoint)  # auto: head keys -> aesthetic
    assert isinstance(reward, AestheticReward) and reward.kind == "aesthetic"
    model, _ = reference
    with torch.no_grad():
        embedding = model.encode_image(open_clip_preprocess(32)(images.permute(0, 3, 1, 2)))
        expected = head.layers(embedding / embedding.norm(dim=-1, keepdim=True)).squeeze(-1)
    scores = reward.score(images)  # prompts are ignored: None is fine
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(reward.score(images, ["anything"] * 4), scores)


def test_aesthetic_linear_head_and_errors(tiny_checkpoint, reference, images, tmp_path):
    torch.manual_seed(1)
    linear = torch.nn.Linear(TINY_VIT_CONFIG["embed_dim"], 1)
    head_file = tmp_path / "sa_0_4_vit_l_14_linear.safetensors"
    save_file(linear.state_dict(), str(head_file))
    reward = load_aesthetic(head_file, tiny_checkpoint)
    model, _ = reference
    with torch.no_grad():
        embedding = F.normalize(model.encode_image(open_clip_preprocess(32)(images.permute(0, 3, 1, 2))), dim=-1)
        torch.testing.assert_close(reward.score(images), linear(embedding).squeeze(-1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="tower="):
        load_reward_model(head_file)
    wide = tmp_path / "vit_l_head.safetensors"
    save_file(torch.nn.Linear(768, 1).state_dict(), str(wide))
    with pytest.raises(ValueError, match="768-dim.*32-dim"):
        load_aesthetic(wide, tiny_checkpoint)
    odd = tmp_path / "odd_head.safetensors"
    save_file({"fc.weight": torch.zeros(1, 32), "fc.bias": torch.zeros(1)}, str(odd))
    with pytest.raises(ValueError, match=r"not an aesthetic head.*fc\.bias"):
        load_aesthetic(odd, tiny_checkpoint)


# -- our trained rewards -------------------------------------------------------------------------------------------
def test_trained_reward_round_trip(reference, tmp_path, images):
    model, tokenizer = reference
    path = tmp_path / "reward.safetensors"
    training = {"lr": 2e-6, "output_dir": tmp_path, "method_steps": [3000, 30000]}
    assert save_trained_reward(model, TINY_VIT_CONFIG, path, "", training) == path
    assert not list(tmp_path.glob("*.tmp"))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        assert set(handle.keys()) == set(model.state_dict())
    assert metadata["refinery.format"] == "reward-clip/1"
    assert metadata["refinery.method"] == "stable-preference"
    assert metadata["refinery.score"] == "cosine"
    assert metadata["refinery.architecture"] == ""
    assert json.loads(metadata["refinery.open_clip_config"]) == TINY_VIT_CONFIG
    assert json.loads(metadata["refinery.training"])["output_dir"] == str(tmp_path)
    reward = load_reward_model(path)  # auto: refinery.format metadata -> trained
    assert isinstance(reward, TrainedClipReward) and reward.metadata["refinery.method"] == "stable-preference"
    with torch.no_grad():
        image = F.normalize(model.encode_image(open_clip_preprocess(32)(images.permute(0, 3, 1, 2))), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
    torch.testing.assert_close(reward.score(images, PROMPTS), (image * text).sum(-1), atol=1e-5, rtol=0)
    named = load_trained_reward(save_trained_reward(model, TINY_VIT_CONFIG, tmp_path / "named.safetensors", ARCH, "{}"))
    torch.testing.assert_close(named.score(images, PROMPTS), reward.score(images, PROMPTS))


def test_trained_reward_refuses_a_model_that_does_not_fit_its_config(reference, tmp_path):
    model, _ = reference
    other = json.loads(json.dumps(TINY_VIT_CONFIG))
    other["vision_cfg"]["layers"] = 2
    with pytest.raises(ValueError, match="does not match its config_dict"):
        save_trained_reward(model, other, tmp_path / "bad.safetensors", "", {})
    assert not (tmp_path / "bad.safetensors").exists()
    save_file(model.state_dict(), str(tmp_path / "future.safetensors"), {"refinery.format": "reward-clip/2"})
    with pytest.raises(ValueError, match="newer version"):
        load_reward_model(tmp_path / "future.safetensors")


# -- loading errors ------------------------------------------------------------------------------------------------
class NotAStateDict:
    """Pickled as code: torch.load(weights_only=True) must refuse it."""


def test_loading_errors_users_can_act_on(tiny_checkpoint, tmp_path):
    missing = tmp_path / "nowhere" / "HPS_v2.pt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_reward_model(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_reward_model(missing, kind="hpsv2")
    unet = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "model.diffusion_model.out.2.bias": torch.zeros(4)}, str(unet))
    with pytest.raises(ValueError, match=r"Stable Diffusion checkpoint \(UNet\).*input_blocks"):
        load_reward_model(unet)
    with pytest.raises(ValueError, match=r"not an open_clip CLIP.*Stable Diffusion"):
        load_reward_model(unet, kind="clip-score", architecture=ARCH)
    other = json.loads(json.dumps(TINY_VIT_CONFIG))
    other["text_cfg"]["layers"] = 1
    build_tiny_vit(tmp_path, "other-reward-vit", other)
    with pytest.raises(ValueError, match=r"does not match architecture 'tiny-reward-vit': 12 missing"):
        load_clip_score(tmp_path / "other-reward-vit.safetensors", architecture=ARCH)
    pickled = tmp_path / "code.pt"
    torch.save({"state_dict": NotAStateDict()}, pickled)
    with pytest.raises(ValueError, match="pickled code"):
        load_reward_model(pickled)
    with pytest.raises(ValueError, match="pickled code"):
        load_reward_model(pickled, kind="hpsv2")
    with pytest.raises(ValueError, match="extension"):
        (tmp_path / "model.onnx").write_bytes(b"0")
        load_reward_model(tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="Unknown reward kind"):
        load_reward_model(tiny_checkpoint, kind="imagereward")
    with pytest.raises(ValueError, match="do not apply to reward kind 'trained'"):
        load_reward_model(tiny_checkpoint, kind="trained", architecture=ARCH)
    with pytest.raises(ValueError, match="Choose the kind"):
        load_reward_model(tiny_checkpoint)
    assert isinstance(load_reward_model(tiny_checkpoint, kind="clip-score"), ClipScoreReward)


def test_a_cut_or_renamed_text_reward_file_is_named_with_what_is_wrong(tiny_checkpoint, tmp_path):
    """torch.load alone raises OSError / IndexError / KeyError here, naming no file."""
    from safetensors.torch import load_file

    whole = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": load_file(str(tiny_checkpoint))}, whole)
    cut = tmp_path / "HPS_v2_cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    text = tmp_path / "HPS_v2_text.pt"
    text.write_text("a note: download the real HPS_v2_compressed.pt here\n")
    for kind in ("auto", "hpsv2"):
        with pytest.raises(ValueError, match=r"'.*HPS_v2_cut\.pt' cannot be read: it is a torch zip "
                                             r"archive cut short"):
            load_reward_model(cut, kind=kind, **({"architecture": ARCH} if kind == "hpsv2" else {}))
    with pytest.raises(ValueError, match=r"'.*HPS_v2_text\.pt' cannot be read: it is a text file .*starting 'a note"):
        load_reward_model(text)
