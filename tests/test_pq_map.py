"""PQ-Map (g-refine.txt eq. 2-3): hand computations of L_raw, the cask effect and BIC(.), the official Q-Refine
embeddings on a ViT-B/16-shaped tower, our own prompt files, and batches of odd sizes."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from comfyui_refinery.core import pq_map
from comfyui_refinery.core.clip_surgery import ImageFeatures, SurgeryCLIP, load_quality_clip
from tiny_models import build_tiny_vit

QREFINE_FOLDER = Path(__file__).resolve().parents[2] / "shared" / "reference" / "qrefine-pq-embeddings"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_quality_clip(build_tiny_vit(tmp_path_factory.mktemp("quality_clip")))


def test_pair_probability_by_hand():
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # two unit features
    pairs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one factor: t+ = e1, t- = e2
    result = pq_map.pair_probability(features, pairs, logit_scale=10.0)
    expected = torch.tensor([[1 / (1 + math.exp(-10.0))], [1 / (1 + math.exp(-10.0 * (0.6 - 0.8)))]])
    torch.testing.assert_close(result, expected)


def test_redundant_similarity_cancels_in_the_pair_softmax():
    features = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    pairs = torch.nn.functional.normalize(torch.randn(3, 2, 8), dim=-1)
    empty = torch.nn.functional.normalize(torch.randn(8), dim=-1)
    logits = 50 * torch.einsum("nd,fkd->nfk", features, pairs) - 50 * (features @ empty)[:, None, None]
    torch.testing.assert_close(pq_map.pair_probability(features, pairs, 50.0), logits.softmax(-1)[..., 0])


def test_cask_effect_by_hand():
    raw = torch.tensor([[0.8, 0.9, 0.5, 1.0], [0.5, 1.0, 1.0, 1.0]])
    alpha = (0.935, 0.892, 0.826)
    expected = torch.tensor([0.8 * (0.9 / 0.935) * (0.5 / 0.892) * 1.0, 0.5])
    torch.testing.assert_close(pq_map.cask_effect(raw, alpha), expected)
    # one alpha per factor: the same raw scores give different results with swapped bounds
    swapped = pq_map.cask_effect(raw[:1], (0.826, 0.892, 0.935))
    assert not torch.allclose(swapped, expected[:1])
    with pytest.raises(ValueError, match="alpha needs 3 bounds"):
        pq_map.cask_effect(raw, (0.9, 0.0, 0.5))


def test_upsampling_keeps_orientation_of_non_square_images():
    # 2x4 patch grid for a 20x40 (H x W) image: the right half is poor quality.
    grid = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]])
    upsampled = pq_map.upsample_map(grid, (20, 40))
    assert upsampled.shape == (1, 20, 40)
    assert upsampled[0, :, :15].min() > 0.9 and upsampled[0, :, 25:].max() < 0.1
    assert 0.0 <= float(upsampled.min()) and float(upsampled.max()) <= 1.0  # bicubic overshoot is clamped


def test_perceptual_quality_on_hand_made_features():
    # One image, 1x2 patch grid, D = 2. Text pairs: every factor has t+ = e1, t- = e2.
    pairs = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(4, 2, 2)
    patches = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # left patch good, right patch bad
    features = ImageFeatures(torch.tensor([[0.6, 0.8]]), patches, image_size=(4, 8))
    result = pq_map.perceptual_quality(features, pairs, logit_scale=20.0, alpha=(0.5, 0.5, 0.5))
    good, bad = 1 / (1 + math.exp(-20)), 1 / (1 + math.exp(20))
    torch.testing.assert_close(result.factor_maps[0, :, 0, 0], torch.full((4,), good))
    cls_raw = 1 / (1 + math.exp(-20 * (0.6 - 0.8)))
    torch.testing.assert_close(result.score, torch.tensor([cls_raw * min(cls_raw / 0.5, 1) ** 3]))
    assert result.map.shape == (1, 4, 8)
    assert result.map[0, :, 0].min() > 0.99 and result.map[0, :, -1].max() < 0.01
    assert bad < 1e-8


def test_text_prompts_on_any_tower_and_batches(encoder):
    prompt_features = pq_map.encode_quality_prompts(encoder, pq_map.text_quality_prompts())
    assert prompt_features.shape == (4, 2, 32)
    for images in (torch.rand(1, 1, 1, 3), torch.rand(5, 33, 70, 3)):
        result = pq_map.perceptual_quality(encoder.encode_image(images), prompt_features, encoder.logit_scale)
        assert result.map.shape == images.shape[:3]
        assert result.score.shape == (images.shape[0],)
        assert 0 <= float(result.map.min()) and float(result.map.max()) <= 1
        assert 0 <= float(result.score.min()) and float(result.score.max()) <= 1


def test_batch_result_equals_single_image_results(encoder):
    prompt_features = pq_map.encode_quality_prompts(encoder, pq_map.text_quality_prompts())
    images = torch.rand(3, 24, 24, 3)
    batch = pq_map.perceptual_quality(encoder.encode_image(images), prompt_features, encoder.logit_scale)
    for index in range(3):
        single = pq_map.perceptual_quality(encoder.encode_image(images[index : index + 1]), prompt_features,
                                           encoder.logit_scale)
        torch.testing.assert_close(single.map[0], batch.map[index], atol=1e-5, rtol=1e-5)


def test_own_prompt_file_round_trip_and_width_check(encoder, tmp_path):
    embeddings, eot = encoder.token_embeddings(["good photo.", "bad photo."])
    prompts = pq_map.QualityPrompts(
        embeddings={factor: embeddings for factor in pq_map.QUALITY_FACTORS},
        eot_positions={factor: eot for factor in pq_map.QUALITY_FACTORS},
        source="test",
    )
    path = pq_map.save_prompt_embeddings(prompts, tmp_path / "learned.safetensors", {"tower": "tiny-vit"})
    assert not list(tmp_path.glob("*.tmp"))
    loaded = pq_map.load_prompt_embeddings(path)
    torch.testing.assert_close(pq_map.encode_quality_prompts(encoder, loaded),
                               pq_map.encode_quality_prompts(encoder, prompts))
    # embeddings from text equal the text path
    from_text = pq_map.encode_quality_prompts(encoder, pq_map.text_quality_prompts(
        {factor: ("good photo.", "bad photo.") for factor in pq_map.QUALITY_FACTORS}))
    torch.testing.assert_close(pq_map.encode_quality_prompts(encoder, loaded), from_text, atol=1e-6, rtol=0)


def test_prompt_file_of_another_kind_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "not-prompts.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a quality-prompt file"):
        pq_map.load_prompt_embeddings(path)
    with pytest.raises(FileNotFoundError, match="lacks 'PQ-overall.pth'"):
        pq_map.load_qrefine_embeddings(tmp_path)


@pytest.mark.needs(QREFINE_FOLDER.is_dir(), f"official embeddings not found at {QREFINE_FOLDER}")
def test_official_qrefine_embeddings_on_a_vit_b16_shaped_tower(encoder):
    import open_clip

    prompts = pq_map.load_qrefine_embeddings(QREFINE_FOLDER)
    raw = torch.load(QREFINE_FOLDER / "PQ-technical.pth", map_location="cpu", weights_only=True)["params"]
    sequence = prompts.embeddings["technical"]
    assert sequence.shape == (2, 77, 512) and prompts.eot_positions["technical"].tolist() == [20, 20]
    torch.testing.assert_close(sequence[:, 0:1], raw["prompt_learner.token_prefix"])
    torch.testing.assert_close(sequence[:, 1:9], raw["prompt_learner.ctx"][:, :8])
    torch.testing.assert_close(sequence[:, 9:12], raw["prompt_learner.token_suffix"][:, :3])
    torch.testing.assert_close(sequence[:, 12:20], raw["prompt_learner.ctx"][:, 8:])
    torch.testing.assert_close(sequence[:, 20:], raw["prompt_learner.token_suffix"][:, 3:])

    torch.manual_seed(0)
    tower = SurgeryCLIP(open_clip.create_model("ViT-B-16-quickgelu", pretrained=None), "ViT-B-16-quickgelu")
    prompt_features = pq_map.encode_quality_prompts(tower, prompts)
    assert prompt_features.shape == (4, 2, 512) and torch.isfinite(prompt_features).all()
    result = pq_map.perceptual_quality(tower.encode_image(torch.rand(2, 48, 80, 3)), prompt_features, 100.0)
    assert result.map.shape == (2, 48, 80) and result.score.shape == (2,)
    # the 512-wide embeddings do not fit the tiny tower's 64-wide text encoder
    with pytest.raises(ValueError, match="made for another CLIP"):
        pq_map.encode_quality_prompts(encoder, prompts)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("cut in the middle", r"it is a torch zip archive cut short \([\d,]+ bytes, its end record is missing\)"),
        ("cut after 40 bytes", r"it is a torch zip archive cut short \(40 bytes"),
        ("empty", r"it is empty \(0 bytes\)"),
        ("readme text", r"it is a text file \(\d+ bytes, starting 'This folder holds the PQ"),
        ("text starting with 'a'", r"it is a text file \(\d+ bytes, starting 'a list of prompts"),
        ("git lfs pointer", r"it is a Git LFS pointer .*git lfs pull"),
        ("html page", r"it is an HTML page"),
    ],
    ids=["cut-middle", "cut-40-bytes", "empty", "readme-text", "text-starting-with-a", "git-lfs-pointer", "html-page"],
)
def test_a_damaged_qrefine_file_is_named_with_what_is_wrong(tmp_path, damage, reason):
    """torch.load itself says 'OSError: [Errno 22] Invalid argument' (a cut archive), 'IndexError: pop from empty
    list' or 'KeyError: 104' (text), never the file: the loader names it and says what is wrong."""
    from tiny_models import write_qrefine_prompts

    folder = write_qrefine_prompts(tmp_path / "qrefine")
    damaged = folder / "PQ-natural.pth"
    whole = damaged.read_bytes()
    contents = {
        "cut in the middle": whole[: len(whole) // 2],
        "cut after 40 bytes": whole[:40],
        "empty": b"",
        "readme text": b"This folder holds the PQ prompt files of Q-Refine.\nSee the README.\n",
        "text starting with 'a'": b"a list of prompts\nanother line\n",
        "git lfs pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 317275\n",
        "html page": b"<!DOCTYPE html><html><body>Sign in to continue</body></html>\n",
    }[damage]
    damaged.write_bytes(contents)

    for load in (pq_map.load_qrefine_embeddings, pq_map.load_prompt_embeddings):
        with pytest.raises(ValueError, match=f"Q-Refine prompt file '{re.escape(str(damaged))}' cannot be read: "
                                             f"{reason}"):
            load(folder)


def test_synthetic_qrefine_files_load_on_a_tower_of_their_width(encoder, tmp_path):
    from tiny_models import write_qrefine_prompts

    prompts = pq_map.load_qrefine_embeddings(write_qrefine_prompts(tmp_path / "qrefine", width=64))
    assert prompts.embeddings["natural"].shape == (2, 77, 64)
    assert pq_map.encode_quality_prompts(encoder, prompts).shape == (4, 2, 32)
