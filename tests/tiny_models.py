"""Tiny, randomly initialised models that tests build in seconds (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_VIT_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_tiny_vit(folder: Path, name: str = "tiny-vit", config: dict | None = None, seed: int = 0) -> Path:
    """Write ``<name>.json`` (open_clip config) and ``<name>.safetensors`` into ``folder``; returns the checkpoint."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config or TINY_VIT_CONFIG))
    open_clip.add_model_config(str(config_path))
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():  # a trained-like temperature so probabilities are not squeezed to 0.5
        model.logit_scale.fill_(torch.tensor(100.0).log())
    checkpoint = folder / f"{name}.safetensors"
    save_file(model.state_dict(), str(checkpoint))
    return checkpoint


TINY_TRANSFORMERS_CLIP = {
    "projection_dim": 24,
    "text_config": {"hidden_size": 48, "intermediate_size": 120, "num_hidden_layers": 2, "num_attention_heads": 3},
    "vision_config": {"hidden_size": 32, "intermediate_size": 80, "num_hidden_layers": 3, "num_attention_heads": 4,
                      "image_size": 32, "patch_size": 8},
}
"""A tiny transformers CLIPModel: head widths 16 (text) and 8 (image), MLP ratio 2.5, so a wrong head count or
MLP width shows; the vocabulary and context are CLIP's (49408 BPE tokens, 77)."""


def build_tiny_transformers_clip(folder: Path, hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5,
                                 seed: int = 0):
    """A randomly initialised transformers ``CLIPModel`` saved with ``save_pretrained`` into ``folder``
    (config.json + model.safetensors); returns the model (eval mode). Every parameter, layer norms and biases
    included, gets random noise (transformers initialises norms to 1 and biases to 0, where a swapped norm or bias
    would not show), and ``logit_scale`` is log 50 (not the init value)."""
    from transformers import CLIPConfig, CLIPModel

    towers = {name: {**TINY_TRANSFORMERS_CLIP[name], "hidden_act": hidden_act, "layer_norm_eps": layer_norm_eps}
              for name in ("text_config", "vision_config")}
    config = CLIPConfig(projection_dim=TINY_TRANSFORMERS_CLIP["projection_dim"], **towers)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        model.logit_scale.fill_(torch.tensor(50.0).log())
    model.save_pretrained(str(folder))
    return model


def write_qrefine_prompts(folder: Path, width: int = 64, seed: int = 0) -> Path:
    """Random prompt files in the official Q-Refine layout (``PQ-<factor>.pth``: ``{"params": {prompt_learner.ctx
    (2, 16, W), token_prefix (2, 1, W), token_suffix (2, 60, W)}}``) for a text tower of width W (64 = the tiny
    ViT's; the official files are 512 wide, for ViT-B/16); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for factor in ("overall", "technical", "rational", "natural"):
        params = {
            "prompt_learner.ctx": torch.randn(2, 16, width, generator=generator),
            "prompt_learner.token_prefix": torch.randn(2, 1, width, generator=generator),
            "prompt_learner.token_suffix": torch.randn(2, 60, width, generator=generator),
        }
        torch.save({"params": params}, folder / f"PQ-{factor}.pth")
    return folder
