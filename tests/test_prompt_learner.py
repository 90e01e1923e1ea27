"""CoOp-style quality-prompt learner: initial sequences, learning a separable label, and the saved file."""

from __future__ import annotations

import pytest
import torch

from comfyui_refinery.core import pq_map, prompt_learner
from comfyui_refinery.core.clip_surgery import ImageFeatures, load_quality_clip
from tiny_models import build_tiny_vit


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_quality_clip(build_tiny_vit(tmp_path_factory.mktemp("quality_clip")))


def test_zero_init_reproduces_the_text_prompt(encoder):
    learner = prompt_learner.QualityPromptLearner(encoder, n_context=4, init_std=0.0)
    texts = [f"X X X X {text}" for factor in pq_map.QUALITY_FACTORS for text in pq_map.DEFAULT_TEXT_PROMPTS[factor]]
    with torch.no_grad():
        torch.testing.assert_close(learner.text_features(encoder).reshape(8, -1), encoder.encode_text(texts),
                                   atol=1e-6, rtol=0)
    assert learner.context.shape == (8, 4, encoder.text_width)


def test_learns_a_separable_quality_label_and_saves_it(encoder, tmp_path):
    torch.manual_seed(0)
    good, bad = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    noise = 0.05 * torch.randn(40, 32)
    cls = torch.nn.functional.normalize(torch.cat([good.expand(20, 32), bad.expand(20, 32)]) + noise, dim=-1)
    patches = cls[:, None, None, :].expand(40, 2, 2, 32)
    features = ImageFeatures(cls, patches, image_size=(8, 8))
    labels = torch.cat([torch.ones(20, 4), torch.zeros(20, 4)])
    result = prompt_learner.train_quality_prompts(encoder, features, labels, steps=150, batch_size=40, progress=False)
    assert result.losses[-1] < 0.1 < result.losses[0]
    prompt_features = pq_map.encode_quality_prompts(encoder, result.prompts)
    quality = pq_map.perceptual_quality(features, prompt_features, encoder.logit_scale, alpha=(0.5, 0.5, 0.5))
    assert quality.score[:20].min() > 0.5 > quality.score[20:].max()
    path = pq_map.save_prompt_embeddings(result.prompts, tmp_path / "learned.safetensors")
    torch.testing.assert_close(pq_map.encode_quality_prompts(encoder, pq_map.load_prompt_embeddings(path)),
                               prompt_features)


def test_bad_arguments(encoder):
    features = ImageFeatures(torch.zeros(3, 32), torch.zeros(3, 1, 1, 32), (4, 4))
    with pytest.raises(ValueError, match=r"labels must be \(3, 4\)"):
        prompt_learner.train_quality_prompts(encoder, features, torch.zeros(3, 2), steps=1)
    with pytest.raises(ValueError, match="n_context must be"):
        prompt_learner.QualityPromptLearner(encoder, n_context=0)
