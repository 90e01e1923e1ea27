"""CLIP-Surgery image encoder over any open_clip ViT, loaded offline from a local checkpoint.

g-refine.txt eq. 1 (and CLIP Surgery, ref. [23] of that paper): in the last ``surgery_depth`` transformer
blocks the patch tokens take a second path whose self-attention uses the value projection as query, key and
value, ``softmax(V V^T / sqrt(d)) V``, skips the FFN, and is added residually. As in the CLIP-Surgery
reference code, the second path's attention reads the *original* path's hidden states (``ln_1`` of the
block input), so the original path, and with it the CLS embedding, is exactly the unmodified model's.

Checkpoints: open_clip state dicts, and transformers ``CLIPModel`` weights (a folder with ``config.json`` and
``model.safetensors``, or the single ``model.safetensors`` of e.g. openai/clip-vit-base-patch16), converted on load
to the same open_clip ViT and text tower (see "transformers CLIPModel layout" below).

Conventions: image tensors handed to :meth:`SurgeryCLIP.preprocess` are ComfyUI-style ``(B, H, W, 3)`` float
in [0, 1]; features returned are L2-normalised.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .weights import load_state_dict, state_dict_mismatch

logger = logging.getLogger(__name__)

_RANDOM_INIT_NOTICE = "No pretrained weights loaded for model"  # open_clip's create_model with pretrained=None


class _DropRandomInitNotice(logging.Filter):
    """Drops open_clip's 'initialized randomly' warning, false where the weights are loaded right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_RANDOM_INIT_NOTICE)


def _create_open_clip_model(name: str):
    """``open_clip.create_model(name, pretrained=None)`` on the CPU, without open_clip's warning that the model is
    initialised randomly (every caller loads a checkpoint into it strictly right after). open_clip logs it on the
    root logger, so the filter sits there, for the duration of this call only."""
    import open_clip

    root = logging.getLogger()
    notice = _DropRandomInitNotice()
    root.addFilter(notice)
    try:
        return open_clip.create_model(name, pretrained=None, device="cpu")
    finally:
        root.removeFilter(notice)

AUTO_ARCHITECTURE = "auto"
"""Architecture name meaning: read an open_clip model config ``<checkpoint stem>.json`` beside the checkpoint."""


@dataclass(frozen=True)
class ImageFeatures:
    """One surgery forward of a batch.

    cls_embedding: (B, D) L2-normalised image embedding, identical to ``model.encode_image`` (up to normalisation).
    patch_features: (B, gh, gw, D) L2-normalised surgery patch features on the tower's patch grid.
    image_size: (H, W) of the images before preprocessing (maps are upsampled back to it).
    """

    cls_embedding: torch.Tensor
    patch_features: torch.Tensor
    image_size: tuple[int, int]


def list_architectures() -> list[str]:
    """open_clip architecture names with a ViT image tower (the towers CLIP-Surgery applies to)."""
    import open_clip

    names = []
    for name in open_clip.list_models():
        config = open_clip.get_model_config(name) or {}
        vision = config.get("vision_cfg", {})
        if "timm_model_name" not in vision and vision.get("layers") is not None and not isinstance(
            vision.get("layers"), (list, tuple)
        ):
            names.append(name)
    return names


def _register_config_beside(checkpoint: Path) -> str:
    """Register ``<stem>.json`` (an open_clip model config) beside ``checkpoint``; returns its name."""
    import open_clip

    config_path = checkpoint.with_suffix(".json")
    if not config_path.is_file():
        raise FileNotFoundError(
            f"Architecture 'auto' needs an open_clip model config '{config_path.name}' beside the checkpoint "
            f"'{checkpoint}', and there is none. Choose the checkpoint's architecture from the list "
            f"(e.g. 'ViT-B-16-quickgelu' for OpenAI ViT-B/16 weights) or put its config JSON beside it."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"'{config_path}' is not a readable JSON model config: {error}") from error
    if not isinstance(config, dict) or "vision_cfg" not in config or "text_cfg" not in config:
        raise ValueError(
            f"'{config_path}' is not an open_clip model config: it needs 'embed_dim', 'vision_cfg' and 'text_cfg'."
        )
    existing = open_clip.get_model_config(config_path.stem)
    if existing is not None and existing != config:
        raise ValueError(
            f"'{config_path.name}' describes another model than open_clip's own architecture '{config_path.stem}'. "
            f"Rename the checkpoint and its JSON (e.g. 'my-{config_path.stem}'), or choose '{config_path.stem}' "
            f"as the architecture and remove the JSON."
        )
    open_clip.add_model_config(str(config_path))
    return config_path.stem


class SurgeryCLIP:
    """An open_clip ViT CLIP with a CLIP-Surgery image path and cached text features.

    Build it with :func:`load_quality_clip` (from a file) or directly from an open_clip model (tests).
    ``surgery_depth`` defaults to half the image tower's depth (6 for 12-layer towers, METHODS.md 1.1).
    ``tokenizer`` defaults to open_clip's tokenizer of ``architecture`` (pass one for a model whose architecture is
    not one of open_clip's names, e.g. a converted transformers CLIP).
    """

    def __init__(self, model, architecture: str, surgery_depth: int | None = None, tokenizer=None):
        import open_clip
        from open_clip.transformer import VisionTransformer

        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"Architecture '{architecture}' has a {type(visual).__name__} image tower; CLIP-Surgery needs an "
                f"open_clip ViT (VisionTransformer). Choose a ViT architecture such as ViT-B-16."
            )
        if visual.attn_pool is not None or visual.final_ln_after_pool or visual.pool_type != "tok":
            raise ValueError(
                f"Architecture '{architecture}' pools its image tokens with '{visual.pool_type}'"
                f"{' and an attention pooler' if visual.attn_pool is not None else ''}; CLIP-Surgery needs CLS-token "
                f"pooling (pool_type 'tok'), as in the OpenAI / LAION ViT towers."
            )
        blocks = visual.transformer.resblocks
        for block in blocks:
            attention = getattr(block, "attn", None)
            if not isinstance(attention, torch.nn.MultiheadAttention) or attention.in_proj_weight is None:
                raise ValueError(
                    f"Architecture '{architecture}' uses {type(attention).__name__} attention blocks; CLIP-Surgery "
                    f"needs the standard fused-QKV nn.MultiheadAttention blocks of open_clip's ViT."
                )
        depth = len(blocks) // 2 if surgery_depth is None else int(surgery_depth)
        if not 1 <= depth <= len(blocks):
            raise ValueError(f"surgery_depth must be in [1, {len(blocks)}] for this tower, got {surgery_depth}.")
        self.model = model.eval().requires_grad_(False)
        self.architecture = architecture
        self.surgery_depth = depth
        self.tokenizer = tokenizer if tokenizer is not None else open_clip.get_tokenizer(architecture)
        self._text_tower = model.text if hasattr(model, "text") else model
        self.context_length = int(self._text_tower.positional_embedding.shape[0])
        self.text_width = int(self._text_tower.token_embedding.weight.shape[1])
        size = visual.image_size
        self.input_size = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._text_cache: dict[str, torch.Tensor] = {}

    # -- device ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    def to(self, device) -> "SurgeryCLIP":
        """Move the model (and the cached text features) to ``device``; returns self."""
        self.model.to(device)
        self._text_cache = {key: value.to(device) for key, value in self._text_cache.items()}
        return self

    @property
    def logit_scale(self) -> float:
        """The model's own CLIP temperature ``exp(logit_scale)`` (about 100 for trained CLIP)."""
        return float(self.model.logit_scale.detach().exp().clamp(max=100.0))

    # -- image ----------------------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, H, W, 3) float in [0, 1] -> (B, 3, h, w) normalised tower input.

        The whole image is resized (bicubic, antialiased, no crop) to the tower's input size, so the patch grid
        covers every pixel of any aspect ratio; maps are resized back to (H, W) afterwards.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Expected images of shape (B, H, W, 3), got {tuple(images.shape)}.")
        pixels = images.to(self.device, torch.float32).permute(0, 3, 1, 2)  # BHWC -> BCHW
        pixels = F.interpolate(pixels, size=self.input_size, mode="bicubic", align_corners=False, antialias=True)
        pixels = (pixels.clamp(0, 1) - self._mean.to(pixels.device)) / self._std.to(pixels.device)
        return pixels.to(self.dtype)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, use_surgery: bool = True) -> ImageFeatures:
        """images: (B, H, W, 3) float in [0, 1] -> :class:`ImageFeatures` from one forward (g-refine.txt eq. 1).

        use_surgery=False gives the plain CLIP patch tokens of the original path instead (the ablation of G-Refine's
        Fig. 4 "original image encoder"); the CLS embedding is the same either way.
        """
        visual = self.model.visual
        x = visual._embeds(self.preprocess(images))  # (B, 1 + gh*gw, width), ln_pre applied
        transformer = visual.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        blocks = transformer.resblocks
        first_surgery_block = len(blocks) - self.surgery_depth
        surgery = None
        for index, block in enumerate(blocks):
            if index >= first_surgery_block:
                if surgery is None:
                    surgery = x
                hidden = block.ln_1(x)
                if not transformer.batch_first:
                    hidden = hidden.transpose(0, 1)
                update = _value_value_attention(block.attn, hidden)
                if not transformer.batch_first:
                    update = update.transpose(0, 1)
                surgery = surgery + block.ls_1(update)  # FFN skipped on the surgery path
            x = block(x)
        if not transformer.batch_first:
            x, surgery = x.transpose(0, 1), surgery.transpose(0, 1)
        pooled, _ = visual._pool(x)  # CLS on the original path
        patches = visual.ln_post((surgery if use_surgery else x)[:, 1:])  # (B, gh*gw, width)
        if visual.proj is not None:
            pooled, patches = pooled @ visual.proj, patches @ visual.proj
        grid_h, grid_w = visual.grid_size
        patches = patches.reshape(patches.shape[0], grid_h, grid_w, -1)  # (B, gh, gw, D)
        return ImageFeatures(
            cls_embedding=F.normalize(pooled.float(), dim=-1),
            patch_features=F.normalize(patches.float(), dim=-1),
            image_size=(int(images.shape[1]), int(images.shape[2])),
        )

    # -- text -----------------------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` including start/end tokens, before truncation to the context."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:
            return 0
        return len(encode(text)) + 2

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """texts: N strings -> (N, D) L2-normalised text features; cached per text for this model.

        Text longer than the tower's context is truncated by the tokenizer (the caller warns; see
        :meth:`count_tokens`).
        """
        missing = [text for text in dict.fromkeys(texts) if text not in self._text_cache]
        if missing:
            tokens = self.tokenizer(missing).to(self.device)
            features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            self._text_cache.update(zip(missing, features))
        return torch.stack([self._text_cache[text] for text in texts]) if texts else torch.zeros(0)

    def token_embeddings(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> ((N, L, W) token embeddings, (N,) end-of-text positions): the input of
        :meth:`encode_token_embeddings`, e.g. to initialise a learned prompt from text."""
        tokens = self.tokenizer(texts).to(self.device)
        return self._text_tower.token_embedding(tokens).detach(), tokens.argmax(dim=-1)

    def encode_token_embeddings(self, embeddings: torch.Tensor, eot_positions: torch.Tensor) -> torch.Tensor:
        """Text features from token embeddings, bypassing the token-embedding layer (g-refine.txt eq. 2).

        embeddings: (N, L, W) with L == context length and W == text width; eot_positions: (N,) int, the index
        whose final hidden state is projected (the end-of-text token). Returns (N, D) L2-normalised features.
        Differentiable in ``embeddings`` (used by the prompt learner); wrap in no_grad for inference.
        """
        tower = self._text_tower
        if embeddings.ndim != 3 or embeddings.shape[1] != self.context_length or embeddings.shape[2] != self.text_width:
            raise ValueError(
                f"Prompt embeddings have shape {tuple(embeddings.shape)}, but this tower ('{self.architecture}') "
                f"takes (N, {self.context_length}, {self.text_width}): they were made for another CLIP. Use "
                f"embeddings trained for this tower, or the 'text prompts' choice."
            )
        cast_dtype = tower.transformer.get_cast_dtype()
        x = embeddings.to(self.device, cast_dtype) + tower.positional_embedding.to(cast_dtype)
        x = tower.transformer(x, attn_mask=tower.attn_mask)
        x = tower.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_positions.to(x.device).long()]
        projection = tower.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
        return F.normalize(x.float(), dim=-1)


def _value_value_attention(attention: torch.nn.MultiheadAttention, hidden: torch.Tensor) -> torch.Tensor:
    """V-V self-attention of g-refine.txt eq. 1: q = k = v = the value projection of ``hidden``.

    hidden: (B, L, width) -> (B, L, width), multi-head, scale 1/sqrt(head_dim), then the block's out_proj.
    """
    width, heads = attention.embed_dim, attention.num_heads
    bias = attention.in_proj_bias[2 * width :] if attention.in_proj_bias is not None else None
    values = F.linear(hidden, attention.in_proj_weight[2 * width :], bias)  # (B, L, width)
    batch, length, _ = values.shape
    values = values.view(batch, length, heads, width // heads).transpose(1, 2)  # (B, heads, L, head_dim)
    mixed = F.scaled_dot_product_attention(values, values, values)
    mixed = mixed.transpose(1, 2).reshape(batch, length, width)  # (B, L, width)
    return attention.out_proj(mixed)


# -- transformers CLIPModel layout --------------------------------------------------------------------------------
# A transformers ``CLIPModel`` holds the same computation as open_clip's CLIP with a ViT image tower: pre-LN blocks,
# a class token and learned position embeddings, ``pre_layrnorm`` (transformers' spelling) before the blocks and
# ``post_layernorm`` on the class token, projections without bias, the same causal text tower pooled at the
# end-of-text token, and ``logit_scale`` as a log. Only the parameter names and layouts differ: q, k and v are
# separate Linear layers (open_clip: one fused ``in_proj``), and the projections are Linear weights (D, width)
# where open_clip keeps (width, D) matrices. The tokenizer is the same CLIP BPE (49,408 tokens, end-of-text 49407
# the highest id), so open_clip's tokenizer gives the ids transformers' CLIPTokenizer gives.
TRANSFORMERS_CLIP_MARKER = "vision_model.embeddings.patch_embedding.weight"
"""A key only a transformers CLIP (or CLIPVision) state dict has, after any prefix such as ``clip.``."""
TRANSFORMERS_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                             "pytorch_model.bin.index.json")
"""The weight files of a transformers folder, in the order they are looked for (an index names its shards)."""
TRANSFORMERS_SIDE_FILES = ("config.json", "preprocessor_config.json", "processor_config.json")
TRANSFORMERS_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                              "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
"""transformers' ``CLIPTextConfig`` defaults: a config.json leaves out what equals them."""
TRANSFORMERS_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "num_channels": 3,
                                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
"""transformers' ``CLIPVisionConfig`` defaults."""
TRANSFORMERS_PROJECTION_DEFAULT = 512
CLIP_BPE_VOCABULARY = 49408
OPENAI_RELEASES = ("ViT-B-32-quickgelu", "ViT-B-16-quickgelu", "ViT-L-14-quickgelu", "ViT-L-14-336-quickgelu")
"""OpenAI's CLIP ViTs (openai/clip-vit-{base-patch32,base-patch16,large-patch14,large-patch14-336}): a
transformers file of exactly their shapes needs no config.json (head width 64 and QuickGELU, as OpenAI trained them)."""
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}
"""transformers ``hidden_act`` -> open_clip ``quick_gelu`` (open_clip's other choice is nn.GELU, exact = "gelu")."""
_LAYER_KEY = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_TOWER_BLOCKS = {"text_model": "transformer.resblocks", "vision_model": "visual.transformer.resblocks"}
_RENAMES = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.pre_layernorm.weight": "visual.ln_pre.weight",  # the spelling some ports use
    "vision_model.pre_layernorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
"""Linear (D, width) weights -> open_clip (width, D) projection matrices."""


def transformers_clip_prefix(keys) -> str | None:
    """The prefix before ``vision_model.`` in a transformers CLIP state dict ("" for ``save_pretrained``'s own
    keys, e.g. "clip." or "model." for wrapped ones), or None when ``keys`` are not a transformers CLIP's."""
    for key in keys:
        if key.endswith(TRANSFORMERS_CLIP_MARKER):
            return key[: -len(TRANSFORMERS_CLIP_MARKER)]
    return None


def convert_transformers_clip(state_dict: dict[str, torch.Tensor],
                              source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel`` state dict -> the open_clip ``CLIP`` state dict of the same model.

    Keys may carry a common prefix (``transformers_clip_prefix``); ``*.position_ids`` buffers (older transformers
    saved them) are dropped; q, k, v (width, width) each are stacked into ``in_proj_weight`` (3 width, width) in
    that order; Linear projections (D, width) are transposed to (width, D). Keys that are not part of a CLIPModel
    are kept under their own names, so loading reports them as unexpected. Raises ValueError for an image-only
    (``CLIPVisionModel``) state dict: the quality CLIP needs the text tower for its prompts.
    """
    prefix = transformers_clip_prefix(state_dict)
    if prefix is None:
        raise ValueError(f"'{source}' is not a transformers CLIP state dict: it has no '{TRANSFORMERS_CLIP_MARKER}'.")
    weights = {key[len(prefix):]: value for key, value in state_dict.items()
               if key.startswith(prefix) and not key.endswith("position_ids")}
    if "text_model.embeddings.token_embedding.weight" not in weights:
        raise ValueError(
            f"'{source}' holds only a CLIP image tower (a transformers CLIPVisionModel): the quality CLIP needs the "
            f"text tower too, for its quality prompts and the AQ-Map. Use the whole CLIPModel's weights."
        )
    converted: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # open_clip in_proj key -> {"q"|"k"|"v": tensor}
    for key, value in weights.items():
        layer = _LAYER_KEY.match(key)
        if key in _RENAMES:
            converted[_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            converted[_TRANSPOSED[key]] = value.T.contiguous()  # (D, width) -> (width, D)
        elif layer is not None:
            tower, index, rest = layer.groups()
            block = f"{_TOWER_BLOCKS[tower]}.{index}"
            projection = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            part, _, parameter = rest.rpartition(".")
            if projection is not None:
                fused.setdefault(f"{block}.attn.in_proj_{projection.group(2)}", {})[projection.group(1)] = value
            elif part in _LAYER_PARTS:
                converted[f"{block}.{_LAYER_PARTS[part]}.{parameter}"] = value
            else:
                converted[key] = value
        else:
            converted[key] = value
    for key, parts in fused.items():
        if set(parts) == {"q", "k", "v"}:
            converted[key] = torch.cat([parts["q"], parts["k"], parts["v"]])  # 3 x (width, ...) -> (3 width, ...)
        else:  # incomplete: keep the parts under their names so loading names what is missing
            converted.update({f"{key}.{name}_proj": value for name, value in parts.items()})
    return converted


def _merged_tower_config(config: dict, tower: str, defaults: dict) -> dict:
    """One tower's transformers config with its defaults; ``<tower>_config_dict`` (older configs such as
    openai/clip-vit-base-patch16's) overrides ``<tower>_config``, as transformers reads them."""
    merged = dict(defaults)
    for key in (f"{tower}_config", f"{tower}_config_dict"):
        if isinstance(config.get(key), dict):
            merged.update({name: value for name, value in config[key].items() if value is not None})
    return merged


def open_clip_config_from_transformers(config: dict, source: str = "config.json") -> dict:
    """A transformers ``CLIPConfig`` (the dict of its config.json) -> the open_clip model config of the same model
    (``embed_dim``, ``quick_gelu``, ``vision_cfg``, ``text_cfg``). Raises ValueError, naming ``source``, for configs
    open_clip's CLIP cannot express (other activations, channels, or vocabularies than CLIP's BPE)."""
    if config.get("model_type") not in (None, "clip") or not isinstance(config.get("vision_config"), dict):
        raise ValueError(
            f"'{source}' is not a transformers CLIPModel config (model_type {config.get('model_type')!r}, expected "
            f"'clip' with a 'vision_config' and a 'text_config')."
        )
    text = _merged_tower_config(config, "text", TRANSFORMERS_TEXT_DEFAULTS)
    vision = _merged_tower_config(config, "vision", TRANSFORMERS_VISION_DEFAULTS)
    activations = {text["hidden_act"], vision["hidden_act"]}
    if len(activations) != 1 or not activations <= set(_ACTIVATIONS):
        raise ValueError(
            f"'{source}' uses the activation(s) {sorted(activations)}; open_clip's CLIP runs one of "
            f"{list(_ACTIVATIONS)} in both towers."
        )
    if int(vision["num_channels"]) != 3:
        raise ValueError(f"'{source}' has an image tower for {vision['num_channels']} channels; pictures have 3.")
    if int(text["vocab_size"]) != CLIP_BPE_VOCABULARY:
        raise ValueError(
            f"'{source}' has a text vocabulary of {text['vocab_size']} tokens, not CLIP's {CLIP_BPE_VOCABULARY} BPE "
            f"tokens: its tokenizer is not CLIP's, which the quality CLIP uses."
        )

    def tower_shape(tower: dict, name: str) -> tuple[int, int, float]:
        width, heads = int(tower["hidden_size"]), int(tower["num_attention_heads"])
        hidden = int(tower["intermediate_size"])
        if width % heads or int(width * (hidden / width)) != hidden:
            raise ValueError(f"'{source}': the {name} tower's width {width}, {heads} heads and MLP width {hidden} "
                             f"do not fit open_clip's transformer.")
        return width, heads, hidden / width

    vision_width, vision_heads, vision_ratio = tower_shape(vision, "image")
    text_width, text_heads, text_ratio = tower_shape(text, "text")
    vision_cfg = {"image_size": int(vision["image_size"]), "layers": int(vision["num_hidden_layers"]),
                  "width": vision_width, "patch_size": int(vision["patch_size"]),
                  "head_width": vision_width // vision_heads, "mlp_ratio": vision_ratio}
    text_cfg = {"context_length": int(text["max_position_embeddings"]), "vocab_size": int(text["vocab_size"]),
                "width": text_width, "heads": text_heads, "layers": int(text["num_hidden_layers"]),
                "mlp_ratio": text_ratio}
    for tower_cfg, tower in ((vision_cfg, vision), (text_cfg, text)):
        if not math.isclose(float(tower["layer_norm_eps"]), 1e-5, rel_tol=1e-6):
            tower_cfg["norm_kwargs"] = {"eps": float(tower["layer_norm_eps"])}
    return {"embed_dim": int(config.get("projection_dim") or TRANSFORMERS_PROJECTION_DEFAULT),
            "quick_gelu": _ACTIVATIONS[vision["hidden_act"]], "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def _normalised_config(config: dict) -> dict | None:
    """An open_clip model config with every tower field filled in from open_clip's defaults, for comparing configs;
    None for configs with more than a plain CLIP (custom text, timm towers, logit bias ...)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    if set(config) - {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}:
        return None
    try:
        vision = vars(CLIPVisionCfg(**config["vision_cfg"]))
        text = vars(CLIPTextCfg(**config["text_cfg"]))
    except TypeError:
        return None
    return {"embed_dim": config["embed_dim"], "quick_gelu": bool(config.get("quick_gelu", False)),
            "vision_cfg": vision, "text_cfg": text}


def open_clip_name_of(config: dict) -> str | None:
    """The open_clip architecture name whose config builds the same model as ``config`` (the shortest such name,
    e.g. 'ViT-B-16-quickgelu' for openai/clip-vit-base-patch16's converted config), or None."""
    import open_clip

    wanted = _normalised_config(config)
    if wanted is None:
        return None
    names = sorted(open_clip.list_models(), key=lambda name: (len(name), name))
    return next((name for name in names if _normalised_config(open_clip.get_model_config(name) or {}) == wanted), None)


def _shape_signature(state_dict: dict[str, torch.Tensor]) -> tuple | None:
    """The sizes an open_clip CLIP state dict pins down: (image width, image layers, patch, image size, image MLP
    width, text width, text layers, context, vocabulary, text MLP width, embedding width); None when incomplete.
    (Head counts and the activation leave no trace in the shapes.)"""

    def layers(prefix: str) -> int:
        return len({key.split(".")[len(prefix.split("."))] for key in state_dict if key.startswith(prefix + ".")})

    try:
        width, _, patch, _ = state_dict["visual.conv1.weight"].shape
        grid = math.isqrt(state_dict["visual.positional_embedding"].shape[0] - 1)
        return (int(width), layers("visual.transformer.resblocks"), int(patch), int(grid * patch),
                int(state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                int(state_dict["token_embedding.weight"].shape[1]), layers("transformer.resblocks"),
                int(state_dict["positional_embedding"].shape[0]), int(state_dict["token_embedding.weight"].shape[0]),
                int(state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                int(state_dict["visual.proj"].shape[1]))
    except (KeyError, ValueError, IndexError):
        return None


def _config_signature(config: dict) -> tuple:
    """:func:`_shape_signature` of the model an open_clip config builds."""
    normalised = _normalised_config(config)
    vision, text = normalised["vision_cfg"], normalised["text_cfg"]
    return (vision["width"], vision["layers"], vision["patch_size"], vision["image_size"],
            int(vision["width"] * vision["mlp_ratio"]), text["width"], text["layers"], text["context_length"],
            text["vocab_size"], int(text["width"] * text["mlp_ratio"]), normalised["embed_dim"])


def openai_release_of(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The open_clip name of the OpenAI CLIP release (:data:`OPENAI_RELEASES`) with exactly the shapes of this
    (converted, open_clip-keyed) state dict, or None."""
    import open_clip

    signature = _shape_signature(state_dict)
    return next((name for name in OPENAI_RELEASES
                 if signature is not None and _config_signature(open_clip.get_model_config(name)) == signature), None)


def _read_json(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"'{path}' is not a readable JSON file: {error}") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"'{path}' holds a JSON {type(loaded).__name__}, not a model config.")
    return loaded


def _transformers_weight_files(checkpoint: Path) -> list[Path]:
    """The weight files to read for ``checkpoint``: a transformers folder's (:data:`TRANSFORMERS_WEIGHT_FILES`; an
    index lists its shards), every shard when ``checkpoint`` is one shard of an index beside it, else itself."""
    def shards(index: Path) -> list[Path]:
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"'{index}' is not a transformers weight index: it has no 'weight_map'.")
        return [index.parent / name for name in sorted(set(weight_map.values()))]

    if checkpoint.is_dir():
        for name in TRANSFORMERS_WEIGHT_FILES:
            if (checkpoint / name).is_file():
                return shards(checkpoint / name) if name.endswith(".index.json") else [checkpoint / name]
        raise FileNotFoundError(
            f"The folder '{checkpoint}' holds no CLIP weights: a transformers CLIPModel folder has config.json and "
            f"one of {list(TRANSFORMERS_WEIGHT_FILES)}."
        )
    for name in TRANSFORMERS_WEIGHT_FILES[1::2]:  # the index files
        index = checkpoint.parent / name
        if index.is_file() and checkpoint in (files := shards(index)):
            return files
    return [checkpoint]


def quality_clip_files(checkpoint: str | os.PathLike) -> list[Path]:
    """Every file :func:`load_quality_clip` may read for ``checkpoint`` that exists: its weights (all shards), the
    open_clip config ``<stem>.json`` and the transformers config.json / preprocessor files beside them. A loader
    node fingerprints these, so replacing any of them reloads the model."""
    checkpoint = Path(checkpoint)
    try:
        weights = _transformers_weight_files(checkpoint) if checkpoint.exists() else [checkpoint]
    except (OSError, ValueError):
        weights = [checkpoint]
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    side = [] if checkpoint.is_dir() else [checkpoint.with_suffix(".json")]
    side += [folder / name for name in TRANSFORMERS_SIDE_FILES + TRANSFORMERS_WEIGHT_FILES[1::2]]
    return [path for path in dict.fromkeys(weights + side) if path.is_file()]


def _image_normalisation(folder: Path) -> tuple[list[float], list[float]] | None:
    """(mean, std) from a transformers ``preprocessor_config.json`` (transformers 4) or ``processor_config.json``
    (transformers 5, under ``image_processor``) in ``folder``, or None (CLIP's OpenAI normalisation then)."""
    for name, entry in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = folder / name
        if path.is_file():
            config = _read_json(path)
            config = config.get(entry, {}) if entry else config
            if isinstance(config, dict) and config.get("image_mean") and config.get("image_std"):
                return list(config["image_mean"]), list(config["image_std"])
    return None


def _transformers_architecture(checkpoint: Path, weights: list[Path], state_dict: dict, architecture: str) -> tuple:
    """(open_clip name or None, open_clip config, label) of a converted transformers CLIP, from the architecture
    chosen, else (``auto``) the first of: an open_clip ``<stem>.json`` or transformers config ``<stem>.json`` beside
    a file, the transformers ``config.json`` beside the weights, the shapes of one of OpenAI's releases."""
    import open_clip

    if architecture != AUTO_ARCHITECTURE:
        return architecture, open_clip.get_model_config(architecture), architecture
    candidates = [] if checkpoint.is_dir() else [checkpoint.with_suffix(".json")]
    candidates.append(weights[0].parent / "config.json")
    for candidate in candidates:
        if not candidate.is_file():
            continue
        config = _read_json(candidate)
        if "vision_cfg" in config and candidate.name != "config.json":  # an open_clip config, as for open_clip files
            name = _register_config_beside(checkpoint)
            return name, open_clip.get_model_config(name), name
        converted = open_clip_config_from_transformers(config, str(candidate))
        name = open_clip_name_of(converted)
        model_name = candidate.parent.name if candidate.name == "config.json" else checkpoint.stem
        return name, converted, name or f"transformers CLIP '{model_name}'"
    release = openai_release_of(state_dict)
    if release is None:
        raise ValueError(
            f"'{checkpoint.name}' is a transformers CLIPModel state dict without its config: its shapes are none of "
            f"OpenAI's releases {list(OPENAI_RELEASES)}, and the head counts and activation cannot be read from "
            f"shapes. Put the model's transformers config.json beside it (or as '{checkpoint.stem}.json'), or choose "
            f"its open_clip architecture."
        )
    logger.info("'%s' has the shapes of OpenAI's %s: loading it as that architecture", checkpoint.name, release)
    return release, open_clip.get_model_config(release), release


def load_quality_clip(
    checkpoint: str | os.PathLike,
    architecture: str = AUTO_ARCHITECTURE,
    surgery_depth: int | None = None,
    device: str | torch.device = "cpu",
) -> SurgeryCLIP:
    """Load an open_clip ViT from a local checkpoint (never downloads) and wrap it as :class:`SurgeryCLIP`.

    checkpoint: ``.safetensors`` (preferred) or a torch state-dict file (``.pt/.pth/.bin``, read with
    ``weights_only=True``); a ``{"state_dict": ...}`` wrapper and DDP ``module.`` prefixes are accepted. It may also
    be a transformers ``CLIPModel``: its folder (config.json + model.safetensors / pytorch_model.bin, or a sharded
    index), or one weights file of that layout; it is converted to the same open_clip model
    (:func:`convert_transformers_clip`), with the image normalisation of a ``preprocessor_config.json`` beside it.
    architecture: an open_clip model name (``open_clip.list_models()``) or ``"auto"``: for open_clip checkpoints,
    read ``<checkpoint stem>.json`` (an open_clip model config) beside the checkpoint; for transformers weights,
    ``<stem>.json`` (either kind of config), else the ``config.json`` beside them, else, for a lone file, the shapes
    of one of OpenAI's releases (:data:`OPENAI_RELEASES`; other shapes need the config).
    """
    import open_clip
    from open_clip.model import CLIP
    from open_clip.tokenizer import SimpleTokenizer

    path = Path(checkpoint)
    weights = _transformers_weight_files(path) if path.exists() else [path]
    state_dict = {}
    for weight_file in weights:
        state_dict.update(load_state_dict(weight_file, what="quality CLIP checkpoint"))
    if any(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    if architecture != AUTO_ARCHITECTURE and architecture not in open_clip.list_models():
        raise ValueError(
            f"Unknown open_clip architecture '{architecture}'. Choose one of open_clip.list_models() (e.g. "
            f"'ViT-B-16'), or 'auto' with a model config JSON beside the checkpoint."
        )
    tokenizer, normalisation = None, None
    layout = "open_clip"
    if transformers_clip_prefix(state_dict) is not None:
        layout = "transformers CLIPModel"
        state_dict = convert_transformers_clip(state_dict, path.name)
        name, config, label = _transformers_architecture(path, weights, state_dict, architecture)
        model = _create_open_clip_model(name) if name else CLIP(**config)
        if name is None:
            tokenizer = SimpleTokenizer(context_length=config["text_cfg"]["context_length"])
        normalisation = _image_normalisation(weights[0].parent)
    elif path.is_dir():
        raise ValueError(
            f"The folder '{path}' holds weights that are not a transformers CLIPModel's; open_clip checkpoints are "
            f"chosen as files."
        )
    else:
        name = _register_config_beside(path) if architecture == AUTO_ARCHITECTURE else architecture
        label = name
        model = _create_open_clip_model(name)
    expected = model.state_dict()
    details = state_dict_mismatch(state_dict, expected)
    if details:
        advice = (
            "Choose the architecture the checkpoint was trained as (OpenAI weights need the '-quickgelu' variant's "
            "name only for activation, not keys), or 'auto' with its config JSON beside it."
            if layout == "open_clip" or architecture != AUTO_ARCHITECTURE else
            "The config it was read with (the config.json or <stem>.json beside the weights, or the shapes of an "
            "OpenAI release) describes another model: put the model's own transformers config.json beside the "
            "weights, or choose its open_clip architecture."
        )
        raise ValueError(
            f"Checkpoint '{path.name}' ({layout} layout) does not match architecture '{label}': {details}. {advice}"
        )
    model.load_state_dict(state_dict, strict=True)
    if normalisation is not None:
        model.visual.image_mean, model.visual.image_std = normalisation
    logger.info("Loaded quality CLIP '%s' (%s layout) from %s", label, layout, path)
    return SurgeryCLIP(model, label, surgery_depth=surgery_depth, tokenizer=tokenizer).to(device)
