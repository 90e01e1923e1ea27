"""The exported LoRA in a real ComfyUI 0.8 (in-process): zero "lora key not loaded", and ComfyUI's patched model
equals diffusers with peft's merged LoRA.

SD1.5: the random full-size SD1.5 of the ``sd15_models`` fixture. A LoRA of rank 4, alpha 2 (so ComfyUI's
alpha / rank = 0.5 matters) on every module kind the exporter writes (attention, projections, feed-forward,
resnet convolutions, time embedding, conv_in/out, samplers) and on all six CLIP-L projections, with random non-zero
A and B, goes through LoraLoaderModelOnly and LoraLoader; the UNet output on a fixed input and the CLIP output on
fixed tokens are compared with diffusers + peft at strength 1.0 and 0.5.

SDXL: building a full-size SDXL in ComfyUI on this CPU is too heavy (about 3.5 G parameters), so ComfyUI's own
SDXL model and CLIP are built on the meta device (no memory) and the LoRA of a tiny UNet with SDXL's block
structure and of two tiny text towers with SDXL's layer counts (12 and 32) goes through ComfyUI's
``comfy.sd.load_lora_for_models``, the function LoraLoader calls: every key must map and patch.
"""

from __future__ import annotations

import pytest
import torch
from comfyui_refinery.core.lora_export import export_comfyui_lora
from comfyui_refinery.trainers.common.lora import adapters_disabled, add_lora
from lora_in_comfyui import (
    LoraWarnings,
    assert_matches_reference,
    comfy_text_output,
    comfy_unet_output,
    read_lora,
    sd15_diffusers_models,
)
from test_lora_export import (ALL_TEXT_TARGETS, ALL_UNET_TARGETS, TINY_SDXL_UNET, randomize_lora, tiny_text_encoder,
                              tiny_unet)

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]  # one thread: a 2-core machine

UNET_LORA = "refinery-test-sd15-unet-lora.safetensors"  # UNet only: what LoraLoaderModelOnly takes
FULL_LORA = "refinery-test-sd15-unet-te-lora.safetensors"  # UNet + CLIP-L: what LoraLoader takes


@pytest.fixture(scope="module")
def sd15_lora(comfy_harness, sd15_models):
    """Exports the LoRA into the harness's models/loras/ and computes the diffusers references:
    {"unet": {strength: output}, "text": {strength: output}, "inputs": ..., "ids": ...}."""
    import folder_paths

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the full-size references on one thread (a 2-core machine); restored below
    unet, text = sd15_diffusers_models()
    add_lora(unet, rank=4, alpha=2.0, target_modules=ALL_UNET_TARGETS)
    add_lora(text, rank=4, alpha=2.0, target_modules=ALL_TEXT_TARGETS, component="text_encoder")
    randomize_lora(unet, text, std=0.04)
    loras = comfy_harness.models_dir / "loras"
    export_comfyui_lora(loras / UNET_LORA, base_family="sd15", method="test", unet=unet, training_args={"rank": 4})
    export_comfyui_lora(loras / FULL_LORA, base_family="sd15", method="test", unet=unet,
                        text_encoders={"text_encoder": text}, training_args={"rank": 4})
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)

    generator = torch.Generator().manual_seed(7)
    latent = torch.randn(1, 4, 8, 8, generator=generator)  # (B, C, H/8, W/8)
    context = torch.randn(1, 77, 768, generator=generator)  # (B, tokens, CLIP-L width)
    timestep = torch.tensor([500.0])
    ids = torch.tensor([[49406, 320, 736, 7117] + [49407] * 73])  # "a red circle", padded with the end token
    unet_out, text_out = {}, {}
    with torch.no_grad():
        with adapters_disabled(unet, text):
            unet_out[0.0], text_out[0.0] = unet(latent, timestep, context).sample, text(ids)[0]
        unet.set_adapters(["default"], weights=[0.5])
        for module in text.modules():  # the same 0.5 scale on the text LoRA (peft's set_scale)
            if hasattr(module, "set_scale") and hasattr(module, "lora_A"):
                module.set_scale("default", 0.5)
        unet_out[0.5], text_out[0.5] = unet(latent, timestep, context).sample, text(ids)[0]
        unet.set_adapters(["default"], weights=[1.0])
        for module in text.modules():
            if hasattr(module, "set_scale") and hasattr(module, "lora_A"):
                module.set_scale("default", 1.0)
        text_layers = {name: module for name, module in text.named_modules() if hasattr(module, "lora_A")}
        base_weights = {name: layer.base_layer.weight.clone() for name, layer in text_layers.items()}
        for module in list(unet.modules()) + list(text.modules()):
            if hasattr(module, "merge") and hasattr(module, "lora_A"):
                module.merge(adapter_names=["default"])
        unet_out[1.0], text_out[1.0] = unet(latent, timestep, context).sample, text(ids)[0]
        # ComfyUI keeps this CLIP's weights in fp16 and stores a patched weight rounded (stochastically) to fp16:
        # measure what fp16 storage of the merged weights alone does to the output (round-to-nearest here)
        merged_weights = {name: layer.base_layer.weight.clone() for name, layer in text_layers.items()}
        for layer in text_layers.values():
            layer.base_layer.weight.copy_(layer.base_layer.weight.half().float())
        text_fp16_noise = (text(ids)[0] - text_out[1.0]).abs().max().item()
    del unet, text
    yield {"folder": loras, "unet": unet_out, "text": text_out, "latent": latent, "context": context,
            "timestep": timestep, "ids": ids, "sd15_models": sd15_models, "text_base_weights": base_weights,
            "text_merged_weights": merged_weights, "text_fp16_noise": text_fp16_noise}
    torch.set_num_threads(threads)
    import comfy.model_management

    comfy.model_management.unload_all_models()  # free the full-size UNets these tests loaded for later tests


def test_sd15_unet_lora_in_comfyui_equals_peft_merged(comfy_harness, sd15_lora):
    """UNETLoader -> LoraLoaderModelOnly at strength 1.0 and 0.5: zero warnings, one patch per LoRA module, and the
    UNet output equals diffusers' with peft's merged LoRA (and with peft at scale 0.5)."""
    import nodes

    tensors, metadata = read_lora(sd15_lora["folder"] / UNET_LORA)
    assert metadata["refinery.base_family"] == "sd15" and metadata["refinery.alpha"] == "2"
    (model,) = nodes.UNETLoader().load_unet(sd15_lora["sd15_models"]["unet"], "default")
    with LoraWarnings() as records:
        (model_full,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, UNET_LORA, 1.0)
        (model_half,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, UNET_LORA, 0.5)
    assert records.not_loaded() == []
    assert len(model_full.patches) == len(model_half.patches) == len(tensors) // 3

    # Both sides run fp32 on the same fp16-rounded base weights and fp32 LoRA factors (the fp16 files cost nothing
    # here: ComfyUI and diffusers upcast the same fp16 values). What differs is the two UNet implementations'
    # operation order (attention, GroupNorm, how the LoRA product is summed), which the base outputs measure; the
    # tolerance is 10x that, and the LoRA moves the output by over 100x the tolerance. Strength 0.5 halves the
    # weight delta; the output delta is about half.
    comfy = {strength: comfy_unet_output(patcher, sd15_lora)
             for strength, patcher in ((0.0, model), (1.0, model_full), (0.5, model_half))}
    assert_matches_reference(comfy, sd15_lora["unet"], "UNet", min_effect=100)


def test_sd15_unet_and_clip_lora_in_comfyui(comfy_harness, sd15_lora):
    """UNETLoader + CLIPLoader -> LoraLoader with the UNet + CLIP-L file: zero warnings, every module patched, and
    the CLIP output equals transformers' CLIP-L with peft's merged LoRA (strength 1.0) and peft at scale 0.5."""
    import nodes

    tensors, _ = read_lora(sd15_lora["folder"] / FULL_LORA)
    text_modules = {key.rsplit(".", 1)[0] for key in tensors if key.startswith("lora_te_") and key.endswith("alpha")}
    assert len(text_modules) == 12 * len(ALL_TEXT_TARGETS)
    names = sd15_lora["sd15_models"]
    (model,) = nodes.UNETLoader().load_unet(names["unet"], "default")
    (clip,) = nodes.CLIPLoader().load_clip(names["text_encoders"], "stable_diffusion")
    with LoraWarnings() as records:
        model_full, clip_full = nodes.LoraLoader().load_lora(model, clip, FULL_LORA, 1.0, 1.0)
        _, clip_half = nodes.LoraLoader().load_lora(model, clip, FULL_LORA, 1.0, 0.5)
    assert records.not_loaded() == []
    assert len(model_full.patches) + len(clip_full.patcher.patches) == len(tensors) // 3
    assert len(clip_full.patcher.patches) == len(text_modules)

    # Weights: ComfyUI patches W (fp16) in fp32 and stores the result stochastically rounded to fp16, so every patched
    # weight must lie within one fp16 spacing of peft's merged W + s * scaling * B A (s = strength).
    import comfy.model_management

    for strength, patched in ((1.0, clip_full), (0.5, clip_half)):
        comfy.model_management.load_models_gpu([patched.patcher])
        state = patched.cond_stage_model.state_dict()
        for name, merged in sd15_lora["text_merged_weights"].items():
            base_weight = sd15_lora["text_base_weights"][name]
            expected = base_weight + strength * (merged - base_weight)
            got = state["clip_l.transformer.text_model." + name.removeprefix("text_model.") + ".weight"]
            assert got.dtype == torch.float16
            spacing = torch.finfo(torch.float16).eps * torch.exp2(torch.floor(torch.log2(expected.abs().clamp_min(
                torch.finfo(torch.float16).tiny))))  # fp16 spacing at |expected|
            assert ((got.float() - expected).abs() <= spacing * 1.001 + 1e-7).all(), (strength, name)

    # Outputs: the difference allowed is 4x what round-to-nearest fp16 storage of the merged weights does to the
    # output (stochastic rounding errs by up to one spacing instead of half), and at least the 1e-4 that the two CLIP
    # implementations may differ by; the LoRA moves the output by far more.
    comfy = {strength: comfy_text_output(patched, sd15_lora)
             for strength, patched in ((0.0, clip), (1.0, clip_full), (0.5, clip_half))}
    assert_matches_reference(comfy, sd15_lora["text"], "CLIP-L", min_effect=20,
                             tolerance_floor=max(1e-4, 4 * sd15_lora["text_fp16_noise"]), half_delta=False)

    # ComfyUI's model-only loader gets no CLIP, so it logs each text-encoder key of such a file as not loaded (and
    # only those): UNet-only trainers should write UNet-only files.
    with LoraWarnings() as records:
        nodes.LoraLoaderModelOnly().load_lora_model_only(model, FULL_LORA, 1.0)
    assert records.not_loaded() and all("lora_te_" in message for message in records.not_loaded())


def test_sdxl_lora_keys_all_map_in_comfyui(comfy_harness, tmp_path):
    """Every key of an SDXL export maps and patches in ComfyUI's SDXL model and CLIP (meta device)."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    from accelerate import init_empty_weights
    from comfyui_refinery.trainers.common.model_loading import diffusers_config_folder
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    config = UNet2DConditionModel.load_config(diffusers_config_folder("sdxl", tmp_path / "configs") / "unet")
    with init_empty_weights():
        full_size = UNet2DConditionModel.from_config(config)
    unet = tiny_unet(TINY_SDXL_UNET)

    def lora_capable(model):
        return {name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear,
                                                                                      torch.nn.Conv2d))}

    assert lora_capable(unet) == lora_capable(full_size)  # the tiny UNet has SDXL's module paths
    adapted = add_lora(unet, rank=4, alpha=8.0, target_modules=ALL_UNET_TARGETS)
    text = tiny_text_encoder(layers=12)  # CLIP-L: 12 layers
    text_2 = tiny_text_encoder(layers=32, width=16, projection=True)  # OpenCLIP-G: 32 layers
    add_lora(text, rank=2, target_modules=ALL_TEXT_TARGETS, component="text_encoder")
    add_lora(text_2, rank=2, target_modules=ALL_TEXT_TARGETS, component="text_encoder_2")
    randomize_lora(unet, text, text_2)
    path = export_comfyui_lora(tmp_path / "xl.safetensors", base_family="sdxl", method="test", unet=unet,
                               text_encoders={"text_encoder": text, "text_encoder_2": text_2})
    lora = load_file(str(path))

    model_config = comfy.model_detection.model_config_from_diffusers_unet(full_size.state_dict())
    assert isinstance(model_config, comfy.supported_models.SDXL)
    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(model_config.get_model({}, "", device="meta"), cpu, cpu)
    clip = comfy.sd.CLIP(model_config.clip_target(), model_options={"initial_device": torch.device("meta"),
                                                                    "load_device": cpu, "offload_device": cpu})
    with LoraWarnings() as records:
        patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    assert records.not_loaded() == []
    unet_patches = set(patched_model.patches)
    clip_patches = set(patched_clip.patcher.patches)
    assert len(unet_patches) == len(adapted) > 700
    assert len(clip_patches) == (12 + 32) * len(ALL_TEXT_TARGETS)
    assert "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight" in unet_patches
    assert "diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight" in unet_patches
    assert "diffusion_model.output_blocks.2.2.conv.weight" in unet_patches  # up_blocks.0.upsamplers.0.conv
    assert "clip_g.transformer.text_model.encoder.layers.31.mlp.fc2.weight" in clip_patches
    assert "clip_l.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight" in clip_patches
