"""The toy world's training scripts: the converted text encoder is toy-clip's, and every long training resumes bit
for bit (a run stopped and continued ends with the same weights as one that never stopped)."""

from __future__ import annotations

import shutil

import numpy as np
import open_clip
import torch

from ci import importorskip

from comfyui_refinery.benchmarks.toyworld import data, scenes
from comfyui_refinery.benchmarks.toyworld.resumable import checkpoint_path, load_state

importorskip("diffusers")  # under CI a missing test dependency fails


def test_converted_text_encoder_equals_toy_clip_encode_text(tmp_path):
    from comfyui_refinery.benchmarks.toyworld.text_encoder import build_tokenizer, load_text_encoder
    from comfyui_refinery.core.clip_surgery import load_quality_clip

    tower = load_quality_clip(data.TOY_CLIP_CHECKPOINT).model
    converted = load_text_encoder(data.TOY_CLIP_CHECKPOINT, with_projection=True)
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    rng = np.random.default_rng(3)
    captions = [scenes.caption(scenes.sample_scene(rng)) for _ in range(18)] + ["", "a broken triangle, grainy"]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        expected = tower.encode_text(open_clip.tokenize(captions, context_length=tokenizer.model_max_length)).float()
        found = converted(ids).text_embeds
    assert tokenizer.model_max_length == 32
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)
    plain = load_text_encoder(data.TOY_CLIP_CHECKPOINT)  # what the pipeline holds: the hidden states
    with torch.no_grad():
        torch.testing.assert_close(plain(ids)[0], converted(ids).last_hidden_state, atol=0, rtol=0)


def test_toy_clip_training_resumes_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    from comfyui_refinery.benchmarks.toyworld import train_clip

    common = ["--steps", "4", "--batch-size", "4", "--warmup", "2", "--threads", "1", "--init-from",
              str(data.TOY_CLIP_CHECKPOINT), "--lock-text", "--checkpoint-minutes", "0"]
    train_clip.main(common + ["--output", str(tmp_path / "straight"), "--work-dir", str(tmp_path / "w1")])
    assert train_clip.main(common + ["--output", str(tmp_path / "resumed"), "--work-dir", str(tmp_path / "w2"),
                                     "--stop-after", "2"]) is None
    assert load_state(checkpoint_path(tmp_path / "w2", "toy-clip"), "auto")["step"] == 2
    train_clip.main(common + ["--output", str(tmp_path / "resumed"), "--work-dir", str(tmp_path / "w2")])
    straight = load_file(str(tmp_path / "straight" / "toy-clip.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "toy-clip.safetensors"))
    original = load_file(str(data.TOY_CLIP_CHECKPOINT))
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    assert not torch.equal(straight["visual.conv1.weight"], original["visual.conv1.weight"])  # it trained
    assert torch.equal(straight["token_embedding.weight"], original["token_embedding.weight"])  # text locked


def test_tiny_sd_vae_and_unet_training_resume_bit_for_bit(tmp_path):
    from comfyui_refinery.benchmarks.toyworld import train_tiny_sd

    def run(work, stage, *extra):
        return train_tiny_sd.main(["--stage", stage, "--work-dir", str(work), "--vae-steps", "3", "--unet-steps", "3",
                                   "--vae-batch-size", "2", "--batch-size", "2", "--snapshot-every", "2",
                                   "--checkpoint-minutes", "0", "--output", str(work / "pipeline"), *extra])

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, "vae")
    run(resumed, "vae", "--stop-after", "1")
    assert not load_state(checkpoint_path(resumed, "vae"), "auto")["done"]
    run(resumed, "vae")
    first, second = (load_state(checkpoint_path(folder, "vae"), "auto") for folder in (straight, resumed))
    assert first["done"] and first["scaling_factor"] == second["scaling_factor"]
    assert all(torch.equal(first["model"][key], second["model"][key]) for key in first["model"])
    run(straight, "unet")
    run(resumed, "unet", "--stop-after", "1")
    run(resumed, "unet")
    first, second = (load_state(checkpoint_path(folder, "unet"), "auto") for folder in (straight, resumed))
    assert first["step"] == second["step"] == 3
    assert all(torch.equal(first["model"][key], second["model"][key]) for key in first["model"])
    assert all(torch.equal(a, b) for a, b in zip(first["ema"]["shadow_params"], second["ema"]["shadow_params"]))
    run(resumed, "export")
    from comfyui_refinery.benchmarks.toyworld.sd_pipeline import load_pipeline

    pipeline = load_pipeline(resumed / "pipeline")
    assert pipeline.unet.config.in_channels == pipeline.vae.config.latent_channels == 8
    assert pipeline.tokenizer.model_max_length == 32 and not (resumed / "pipeline.tmp").exists()
    shutil.rmtree(tmp_path)


def test_held_out_captions_never_reach_the_generator():
    from comfyui_refinery.benchmarks.toyworld.train_tiny_sd import UNET_SEED_OFFSET, training_batch

    captions = [caption for step in range(5) for caption in training_batch(step, 16, UNET_SEED_OFFSET)[1]]
    assert len(captions) == 80 and not any(scenes.held_out_caption(caption) for caption in captions)
    held_out = [scenes.caption(scene) for scene in scenes.held_out_scenes(20, seed=1)]
    assert all(scenes.held_out_caption(caption) for caption in held_out)
