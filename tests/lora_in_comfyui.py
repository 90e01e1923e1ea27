"""Checks of an exported LoRA inside the real ComfyUI 0.8 (in-process), shared by ``test_comfyui_lora.py`` (peft's
export), ``test_comfyui_rankdpo.py`` and ``test_comfyui_focus_n_fix.py`` (the trainers' files): ComfyUI's warnings,
the random SD1.5 as diffusers / transformers models, ComfyUI's UNet and CLIP outputs on a fixed input, and their
comparison with the reference at strengths 0, 0.5 and 1."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


class LoraWarnings(logging.Handler):
    """Every log message at WARNING and above, from any logger (ComfyUI logs on the root logger)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> LoraWarnings:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)

    def not_loaded(self) -> list[str]:
        return [m for m in self.messages if "lora key not loaded" in m or m.startswith("NOT LOADED")]


def sd15_diffusers_models():
    """The cached random SD1.5 UNet and CLIP-L as diffusers/transformers fp32 models (the same fp16 files ComfyUI
    loads, upcast), built on the meta device and filled from the files (no random init of 1 G parameters)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from sd15_checkpoint import CLIP_CONFIG, CLIP_FILE, UNET_CONFIG, UNET_FILE, build_sd15
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = build_sd15()
    with init_empty_weights():
        unet = UNet2DConditionModel(**UNET_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))
    state = {key: value.float() for key, value in load_file(str(folder / "unet" / UNET_FILE)).items()}
    unet.load_state_dict(state, strict=True, assign=True)
    state = load_file(str(folder / "text_encoders" / CLIP_FILE))
    prefix = "" if hasattr(text, "text_model") else "text_model."  # transformers 5's CLIPTextModel has no text_model
    state = {key.removeprefix(prefix): value.float() for key, value in state.items()}
    missing, unexpected = text.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and all(key.endswith("position_ids") for key in missing), (missing, unexpected)
    return unet.eval(), text.eval()


def comfy_unet_output(patcher, reference: dict) -> torch.Tensor:
    """Patch the weights (ComfyUI's own loading path) and run the ComfyUI UNet on the reference input."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    model = patcher.model.diffusion_model
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        out = model(reference["latent"].to(dtype), timesteps=reference["timestep"].to(dtype),
                    context=reference["context"].to(dtype))
    return out.float()


def comfy_text_output(clip, reference: dict) -> torch.Tensor:
    """CLIP-L's last hidden state (after the final layer norm: SD1.5's layer) for the reference token ids."""
    tokens = {"l": [[(int(token), 1.0) for token in reference["ids"][0]]]}
    return clip.encode_from_tokens(tokens).float()


def assert_matches_reference(comfy: dict[float, torch.Tensor], reference: dict[float, torch.Tensor], what: str,
                             min_effect: float, tolerance_floor: float = 1e-4, half_delta: bool = True) -> None:
    """ComfyUI's outputs against the reference's (diffusers / transformers with the LoRA merged), both keyed by
    strength: 0.0 (no LoRA), 1.0, and 0.5 where the reference has it.

    The base outputs measure how far the two implementations differ (``noise``, under 1e-4); the tolerance is
    ``max(tolerance_floor, 10 x noise)``; the LoRA must move the reference by over ``min_effect`` x that tolerance
    (else equality would prove nothing). half_delta: strength 0.5 also gives about half ComfyUI's output delta
    (exactly half only for a linear network)."""
    noise = (comfy[0.0] - reference[0.0]).abs().max().item()
    assert noise < 1e-4, f"ComfyUI and the reference disagree on the base {what} by {noise}"
    tolerance = max(tolerance_floor, 10 * noise)
    effect = (reference[1.0] - reference[0.0]).abs().max().item()
    assert effect > min_effect * tolerance, (what, effect, tolerance)
    for strength in (1.0, 0.5):
        if strength in reference:
            torch.testing.assert_close(comfy[strength], reference[strength], rtol=0, atol=tolerance)
    if half_delta:
        full, half = comfy[1.0] - comfy[0.0], comfy[0.5] - comfy[0.0]
        ratio = (half.flatten() @ full.flatten()) / full.square().sum()
        assert ratio.item() == pytest.approx(0.5, abs=0.05), (what, ratio.item(), effect, tolerance)


def assert_exact_in_comfyui(sd15_models, lora_path, method: str) -> None:
    """The LoRA file at ``lora_path`` (in ComfyUI's loras folder) loads with LoraLoaderModelOnly with zero
    "lora key not loaded", one patch per module, and equals the hand-merged diffusers UNet at strength 1.0; the
    output delta about halves at 0.5. ``method``: the trainer named in the file's metadata."""
    import nodes

    torch.set_num_threads(2)
    lora_name = lora_path.name
    tensors, metadata = read_lora(lora_path)
    assert metadata["refinery.method"] == method and metadata["refinery.base_family"] == "sd15"
    assert metadata["refinery.alpha"] == "2" and metadata["refinery.rank"] == "4"
    modules = {key.rsplit(".", 1)[0] for key in tensors if key.endswith(".alpha")}
    assert modules and all(key.startswith("lora_unet_") for key in tensors)

    (model,) = nodes.UNETLoader().load_unet(sd15_models["unet"], "default")
    with LoraWarnings() as records:
        (model_full,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, 1.0)
        (model_half,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, 0.5)
    assert records.not_loaded() == []
    assert len(model_full.patches) == len(modules)

    # the diffusers UNet with the file's LoRA merged by hand, on a fixed input
    unet, _ = sd15_diffusers_models()
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

    comfy = {strength: comfy_unet_output(patcher, reference_input)
             for strength, patcher in ((0.0, model), (1.0, model_full), (0.5, model_half))}
    assert_matches_reference(comfy, outputs, "UNet", min_effect=20)  # two training steps moved the UNet measurably
