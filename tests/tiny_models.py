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
