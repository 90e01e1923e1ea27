"""toy-clip's text tower as a transformers ``CLIPTextModel``: tiny-sd v2's frozen, pretrained text encoder.

Real Stable Diffusion conditions its UNet on a pretrained CLIP text encoder that stays frozen while the UNet
learns. tiny-sd v2 does the same with toy-clip: its open_clip text tower (token and position embeddings, causal
pre-LN transformer, final LayerNorm, projection) is copied key by key into transformers' ``CLIPTextModel``, so the
pipeline stays a plain ``StableDiffusionPipeline`` (which reads ``text_encoder(ids)[0]``, the final LayerNorm's
hidden states, shape (B, 32, 64)) and loads in the Img2Img and Inpaint pipelines as before.

``CLIPTextModelWithProjection`` built from the same weights reproduces ``open_clip`` ``encode_text`` (the EOT
token's state times ``text_projection``); the tests check it on 20 captions within 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import TOY_CLIP_CHECKPOINT

EOT_TOKEN_ID = 49407
BOT_TOKEN_ID = 49406


def open_clip_text_config(checkpoint: Path = TOY_CLIP_CHECKPOINT) -> dict:
    """``text_cfg`` and ``embed_dim`` of the open_clip config beside ``checkpoint`` (``<stem>.json``)."""
    config = json.loads(Path(checkpoint).with_suffix(".json").read_text())
    return {**config["text_cfg"], "embed_dim": config["embed_dim"]}


def clip_text_config(checkpoint: Path = TOY_CLIP_CHECKPOINT):
    """The transformers ``CLIPTextConfig`` of the checkpoint's text tower (open_clip's MLP ratio 4, exact GELU)."""
    from transformers import CLIPTextConfig

    text = open_clip_text_config(checkpoint)
    return CLIPTextConfig(
        vocab_size=text["vocab_size"], hidden_size=text["width"], intermediate_size=4 * text["width"],
        num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
        max_position_embeddings=text["context_length"], projection_dim=text["embed_dim"], hidden_act="gelu",
        layer_norm_eps=1e-5, bos_token_id=BOT_TOKEN_ID, eos_token_id=EOT_TOKEN_ID, pad_token_id=EOT_TOKEN_ID,
    )


def convert_text_state_dict(open_clip_state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """open_clip text-tower keys -> ``CLIPTextModelWithProjection`` keys (``text_model.*`` and
    ``text_projection.weight``). The fused ``in_proj`` (3D, D) splits into q, k, v in that order; open_clip's
    ``text_projection`` (D, E) is used as ``x @ P``, a ``Linear`` weight is its transpose."""
    state = {
        "text_model.embeddings.token_embedding.weight": open_clip_state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": open_clip_state["positional_embedding"],
        "text_model.final_layer_norm.weight": open_clip_state["ln_final.weight"],
        "text_model.final_layer_norm.bias": open_clip_state["ln_final.bias"],
        "text_projection.weight": open_clip_state["text_projection"].T.contiguous(),
    }
    for index in range(layers):
        source, target = f"transformer.resblocks.{index}.", f"text_model.encoder.layers.{index}."
        for name, part in zip(("q_proj", "k_proj", "v_proj"),
                              open_clip_state[source + "attn.in_proj_weight"].chunk(3, dim=0)):
            state[target + f"self_attn.{name}.weight"] = part.contiguous()
        for name, part in zip(("q_proj", "k_proj", "v_proj"),
                              open_clip_state[source + "attn.in_proj_bias"].chunk(3, dim=0)):
            state[target + f"self_attn.{name}.bias"] = part.contiguous()
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for old, new in pairs.items():
            for suffix in ("weight", "bias"):
                state[target + f"{new}.{suffix}"] = open_clip_state[source + f"{old}.{suffix}"]
    return state


def load_text_encoder(checkpoint: Path = TOY_CLIP_CHECKPOINT, with_projection: bool = False):
    """toy-clip's text tower as a float32 ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``), eval mode,
    every weight loaded (a missing or unexpected key raises)."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = clip_text_config(checkpoint)
    state = convert_text_state_dict(
        {key: value.float() for key, value in load_file(str(checkpoint)).items() if not key.startswith("visual.")},
        config.num_hidden_layers,
    )
    if with_projection:
        model = CLIPTextModelWithProjection(config)
    else:
        model = CLIPTextModel(config)
        state.pop("text_projection.weight")
        if not any(key.startswith("text_model.") for key in model.state_dict()):  # transformers >= 5
            state = {key.removeprefix("text_model."): value for key, value in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"toy-clip text tower conversion: missing {missing}, unexpected {unexpected}")
    return model.eval()


def build_tokenizer(folder: Path, checkpoint: Path = TOY_CLIP_CHECKPOINT):
    """CLIP's BPE ``CLIPTokenizer`` with toy-clip's context length (32), padding with the EOT token."""
    from .sd_pipeline import build_tokenizer as build_clip_tokenizer

    return build_clip_tokenizer(folder, context_length=open_clip_text_config(checkpoint)["context_length"])
