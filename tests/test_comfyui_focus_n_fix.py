"""A LoRA written by ``refinery-train-focus-n-fix`` after two steps on the random full-size SD1.5 single-file
checkpoint (64 px, 2 sampling steps, K = 1, a differentiable redness reward), loaded by the real ComfyUI 0.8
(in-process): zero "lora key not loaded", one patch per module, equal to the hand-merged diffusers UNet at strength
1.0, half the delta at 0.5."""

from __future__ import annotations

import pytest
import torch
from comfyui_refinery.trainers.focus_n_fix import train as trainer
from comfyui_refinery.trainers.focus_n_fix.config import parse_args
from lora_in_comfyui import assert_exact_in_comfyui
from test_focus_n_fix_trainer import TOY_CLIP, RednessReward, write_prompts

pytestmark = pytest.mark.comfyui

LORA_NAME = "refinery-test-focus-n-fix-sd15.safetensors"


@pytest.fixture(scope="module")
def trained_lora(comfy_harness, sd15_checkpoint, tmp_path_factory):
    import folder_paths

    torch.set_num_threads(2)
    work = tmp_path_factory.mktemp("focus-n-fix-comfyui")
    loras = comfy_harness.models_dir / "loras"
    config = parse_args(["--prompts", str(write_prompts(work)), "--model", str(sd15_checkpoint), "--reward",
                         str(TOY_CLIP), "--reward-kind", "clip-score", "--output-dir", str(loras), "--output-name",
                         LORA_NAME.removesuffix(".safetensors"), "--resolution", "64", "--sampling-steps", "2",
                         "--truncate-k", "1", "--guidance-scale", "1", "--rank", "4", "--lora-alpha", "2",
                         "--train-batch-size", "1", "--max-train-steps", "2", "--learning-rate", "3e-3",
                         "--lr-warmup-steps", "0", "--lr-scheduler", "constant", "--checkpointing-steps", "100",
                         "--mask-samples", "0", "--beta", "0.1", "--overwrite", "--threads", "2"])
    path = trainer.train(config, reward=RednessReward())  # toy-clip's CLIPScore is flat (0) on random-model pictures
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    yield path
    import comfy.model_management

    comfy.model_management.unload_all_models()


def test_focus_n_fix_lora_loads_in_comfyui_and_equals_the_merged_weights(comfy_harness, sd15_models, trained_lora):
    assert_exact_in_comfyui(sd15_models, trained_lora, "focus-n-fix")
