"""A LoRA written by ``refinery-train-rankdpo`` after two training steps on the random full-size SD1.5 single-file
checkpoint, loaded by the real ComfyUI 0.8 (in-process): zero "lora key not loaded", one patch per LoRA module, and
ComfyUI's patched UNet equals the diffusers UNet with the file's LoRA merged by hand (W + alpha / rank * up @ down)
at strength 1.0; at strength 0.5 the weight delta halves."""

from __future__ import annotations

import pytest
import torch
from comfyui_refinery.trainers.rankdpo import train as trainer
from comfyui_refinery.trainers.rankdpo.config import parse_args
from test_comfyui_lora import _comfy_unet_output, _Records, _sd15_diffusers_models
from test_lora_export import read_lora
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


def assert_exact_in_comfyui(sd15_models, lora_path, method: str) -> None:
    """The LoRA file at ``lora_path`` (in ComfyUI's loras folder) loads with LoraLoaderModelOnly with zero
    "lora key not loaded", one patch per module, and equals the hand-merged diffusers UNet at strength 1.0; the
    weight delta halves at 0.5."""
    import nodes

    torch.set_num_threads(2)
    lora_name = lora_path.name
    tensors, metadata = read_lora(lora_path)
    assert metadata["refinery.method"] == method and metadata["refinery.base_family"] == "sd15"
    assert metadata["refinery.alpha"] == "2" and metadata["refinery.rank"] == "4"
    modules = {key.rsplit(".", 1)[0] for key in tensors if key.endswith(".alpha")}
    assert modules and all(key.startswith("lora_unet_") for key in tensors)

    (model,) = nodes.UNETLoader().load_unet(sd15_models["unet"], "default")
    with _Records() as records:
        (model_full,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, 1.0)
        (model_half,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, 0.5)
    assert records.not_loaded() == []
    assert len(model_full.patches) == len(modules)

    # the diffusers UNet with the file's LoRA merged by hand, on a fixed input
    unet, _ = _sd15_diffusers_models()
    generator = torch.Generator().manual_seed(11)
    reference_input = {"latent": torch.randn(1, 4, 8, 8, generator=generator), "timestep": torch.tensor([400.0]),
                       "context": torch.randn(1, 77, 768, generator=generator)}
    outputs = {}
    with torch.no_grad():
        outputs[0.0] = unet(reference_input["latent"], reference_input["timestep"], reference_input["context"]).sample
        by_key = {"lora_unet_" + name.replace(".", "_"): module for name, module in unet.named_modules() if name}
        for key in modules:
            layer = by_key[key]
            down, up = tensors[key + ".lora_down.weight"].float(), tensors[key + ".lora_up.weight"].float()
            scale = tensors[key + ".alpha"].item() / down.shape[0]
            delta = (up.flatten(1) @ down.flatten(1)).view(layer.weight.shape) * scale
            layer.weight += delta
        outputs[1.0] = unet(reference_input["latent"], reference_input["timestep"], reference_input["context"]).sample
    del unet

    base = _comfy_unet_output(model, reference_input)
    full = _comfy_unet_output(model_full, reference_input)
    half = _comfy_unet_output(model_half, reference_input)
    noise = (base - outputs[0.0]).abs().max().item()
    assert noise < 1e-4, f"ComfyUI and diffusers disagree on the base UNet by {noise}"
    tolerance = max(1e-4, 10 * noise)
    effect = (outputs[1.0] - outputs[0.0]).abs().max().item()
    assert effect > 20 * tolerance, (effect, tolerance)  # two training steps moved the UNet measurably
    torch.testing.assert_close(full, outputs[1.0], rtol=0, atol=tolerance)
    ratio = ((half - base).flatten() @ (full - base).flatten()) / (full - base).square().sum()
    assert ratio.item() == pytest.approx(0.5, abs=0.05), (ratio.item(), effect, tolerance)
