"""A LoRA written by ``refinery-train-rankdpo`` after two training steps on the random full-size SD1.5 single-file
checkpoint, loaded by the real ComfyUI 0.8 (in-process): zero "lora key not loaded", one patch per LoRA module, and
ComfyUI's patched UNet equals the diffusers UNet with the file's LoRA merged by hand (W + alpha / rank * up @ down)
at strength 1.0; at strength 0.5 the weight delta halves."""

from __future__ import annotations

import pytest
import torch
from comfyui_refinery.trainers.rankdpo import train as trainer
from comfyui_refinery.trainers.rankdpo.config import parse_args
from lora_in_comfyui import assert_exact_in_comfyui
from test_rankdpo_trainer import write_dataset

pytestmark = pytest.mark.comfyui

LORA_NAME = "refinery-test-rankdpo-sd15.safetensors"


@pytest.fixture(scope="module")
def trained_lora(comfy_harness, sd15_checkpoint, sd15_models, tmp_path_factory):
    """Two RankDPO steps (2 prompt groups of 2 pictures, 64 px, rank 4, alpha 2, a large learning rate so that the
    LoRA visibly moves the UNet) on the single-file checkpoint; the file is written into models/loras/."""
    import folder_paths

    torch.set_num_threads(2)
    work = tmp_path_factory.mktemp("rankdpo-comfyui")
    dataset = write_dataset(work / "data", prompts=2, k=2)
    loras = comfy_harness.models_dir / "loras"
    config = parse_args(["--dataset", str(dataset), "--model", str(sd15_checkpoint), "--output-dir", str(loras),
                         "--output-name", LORA_NAME.removesuffix(".safetensors"), "--resolution", "64",
                         "--rank", "4", "--lora-alpha", "2", "--train-batch-size", "1", "--max-train-steps", "2",
                         "--learning-rate", "3e-3", "--lr-warmup-steps", "0", "--lr-scheduler", "constant",
                         "--checkpointing-steps", "100", "--overwrite", "--threads", "2"])
    path = trainer.train(config)
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    yield path
    import comfy.model_management

    comfy.model_management.unload_all_models()


def test_trained_lora_loads_in_comfyui_and_equals_the_merged_weights(comfy_harness, sd15_models, trained_lora):
    assert_exact_in_comfyui(sd15_models, trained_lora, "rankdpo")
