"""The one composition of PQ-Map and AQ-Map (core/quality_maps.py): one forward per chunk serves both maps, chunks
and prompt forms give the same maps, progress is reported per chunk, and the results can enter a training loss."""

from __future__ import annotations

import pytest
import torch

from comfyui_refinery.core import aq_map, pq_map
from comfyui_refinery.core.clip_surgery import load_quality_clip
from comfyui_refinery.core.quality_maps import compute_quality_maps
from tiny_models import build_tiny_vit

PROMPTS = ["a red circle next to a blue square", "a green cat", "a dog under a yellow tree"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_quality_clip(build_tiny_vit(tmp_path_factory.mktemp("quality_clip")))


@pytest.fixture(scope="module")
def images():
    return torch.rand(len(PROMPTS), 24, 40, 3, generator=torch.Generator().manual_seed(3))


def test_both_maps_equal_the_pq_and_aq_maps_of_one_forward(encoder, images):
    alpha = (0.6, 0.5, 0.4)
    maps = compute_quality_maps(encoder, images, alpha=alpha, temperature=30.0, prompt=PROMPTS, noun_bound=0.4,
                                phrase_bound=0.6, emphasis=1.3)
    features = encoder.encode_image(images)
    prompt_features = pq_map.encode_quality_prompts(encoder, pq_map.text_quality_prompts())
    perceptual = pq_map.perceptual_quality(features, prompt_features, 30.0, alpha)
    alignment = aq_map.alignment_quality(encoder, features, PROMPTS, 0.4, 0.6, 1.3)
    torch.testing.assert_close(maps.perceptual_map, perceptual.map, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps.perceptual_score, perceptual.score, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps.alignment_map, alignment.map, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps.alignment_score, alignment.score, rtol=0, atol=1e-6)
    assert maps.emphasized_prompts == alignment.emphasized_prompts and maps.reports == alignment.reports
    assert maps.perceptual_map.shape == maps.alignment_map.shape == images.shape[:3]


def test_chunks_prompt_forms_and_encoded_prompts_give_the_same_maps(encoder, images):
    whole = compute_quality_maps(encoder, images, prompt=PROMPTS[0])
    done = []
    encoded = pq_map.encode_quality_prompts(encoder, pq_map.text_quality_prompts())  # (4, 2, D)
    chunked = compute_quality_maps(encoder, images, prompt=[PROMPTS[0]] * 3, chunk_size=2, quality_prompts=encoded,
                                   progress=lambda count, total: done.append((count, total)))
    assert done == [(0, 3), (2, 3), (3, 3)]
    for name in ("perceptual_map", "perceptual_score", "alignment_map", "alignment_score"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=0, atol=1e-6)
    per_image = compute_quality_maps(encoder, images, perceptual=False, prompt=PROMPTS)
    assert per_image.perceptual_map is None and per_image.perceptual_score is None
    assert [rows[0].phrase for rows in per_image.reports] != [rows[0].phrase for rows in whole.reports]
    only_pq = compute_quality_maps(encoder, images)
    assert only_pq.alignment_map is None and only_pq.reports == []
    with pytest.raises(ValueError, match="Got 2 prompts for 3 images"):
        compute_quality_maps(encoder, images, prompt=PROMPTS[:2])
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        compute_quality_maps(encoder, images, chunk_size=0)


def test_reused_features_are_shared_between_calls_and_give_the_same_maps(encoder, images):
    forwards = []
    hook = encoder.model.visual.conv1.register_forward_hook(lambda *_: forwards.append(1))
    try:
        perceptual = compute_quality_maps(encoder, images, chunk_size=2, reuse_features=True)
        alignment = compute_quality_maps(encoder, images.clone(), perceptual=False, prompt=PROMPTS, chunk_size=2,
                                         reuse_features=True)
    finally:
        hook.remove()
    assert len(forwards) == 2  # two chunks, each encoded once for both calls
    fresh = compute_quality_maps(encoder, images, prompt=PROMPTS)
    torch.testing.assert_close(perceptual.perceptual_map, fresh.perceptual_map, rtol=0, atol=1e-6)
    torch.testing.assert_close(alignment.alignment_map, fresh.alignment_map, rtol=0, atol=1e-6)


def test_maps_can_enter_a_training_loss(encoder, images):
    """The Focus-N-Fix region function multiplies the mask into a differentiable loss: the maps must be ordinary
    tensors (an inference-mode tensor cannot be saved for backward), even when computed under inference mode."""
    with torch.inference_mode():
        prompt_features = pq_map.encode_quality_prompts(encoder, pq_map.text_quality_prompts())
    maps = compute_quality_maps(encoder, images, quality_prompts=prompt_features, prompt=PROMPTS)
    generated = torch.rand(images.shape[:3], requires_grad=True)
    (maps.perceptual_map * maps.alignment_map * generated).sum().backward()  # saves both maps for backward
    assert generated.grad is not None and not maps.perceptual_map.requires_grad
    assert not any(tensor.is_inference() for tensor in (maps.perceptual_map, maps.perceptual_score,
                                                         maps.alignment_map, maps.alignment_score))


def test_alignment_temperature_reaches_the_aq_map(encoder, images):
    features = encoder.encode_image(images)
    for temperature in (3.0, 40.0):
        maps = compute_quality_maps(encoder, images, perceptual=False, prompt=PROMPTS,
                                    alignment_temperature=temperature)
        alignment = aq_map.alignment_quality(encoder, features, PROMPTS, temperature=temperature)
        torch.testing.assert_close(maps.alignment_score, alignment.score, rtol=0, atol=1e-6)
    default = compute_quality_maps(encoder, images, perceptual=False, prompt=PROMPTS)
    hot = compute_quality_maps(encoder, images, perceptual=False, prompt=PROMPTS, alignment_temperature=40.0)
    assert [row.phrase_score for row in default.reports[0]] != [row.phrase_score for row in hot.reports[0]]
