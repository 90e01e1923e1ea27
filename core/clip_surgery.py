"""CLIP-Surgery image encoder over any open_clip ViT, loaded offline from a local checkpoint.

g-refine.txt eq. 1 (and CLIP Surgery, ref. [23] of that paper): in the last ``surgery_depth`` transformer
blocks the patch tokens take a second path whose self-attention uses the value projection as query, key and
value, ``softmax(V V^T / sqrt(d)) V``, skips the FFN, and is added residually. As in the CLIP-Surgery
reference code, the second path's attention reads the *original* path's hidden states (``ln_1`` of the
block input), so the original path, and with it the CLS embedding, is exactly the unmodified model's.

Conventions: image tensors handed to :meth:`SurgeryCLIP.preprocess` are ComfyUI-style ``(B, H, W, 3)`` float
in [0, 1]; features returned are L2-normalised.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .weights import load_state_dict, state_dict_mismatch

logger = logging.getLogger(__name__)

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
    """

    def __init__(self, model, architecture: str, surgery_depth: int | None = None):
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
        self.tokenizer = open_clip.get_tokenizer(architecture)
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


def load_quality_clip(
    checkpoint: str | os.PathLike,
    architecture: str = AUTO_ARCHITECTURE,
    surgery_depth: int | None = None,
    device: str | torch.device = "cpu",
) -> SurgeryCLIP:
    """Load an open_clip ViT from a local checkpoint (never downloads) and wrap it as :class:`SurgeryCLIP`.

    checkpoint: ``.safetensors`` (preferred) or a torch state-dict file (``.pt/.pth/.bin``, read with
    ``weights_only=True``); a ``{"state_dict": ...}`` wrapper and DDP ``module.`` prefixes are accepted.
    architecture: an open_clip model name (``open_clip.list_models()``) or ``"auto"`` to read
    ``<checkpoint stem>.json`` (an open_clip model config) beside the checkpoint.
    """
    import open_clip

    path = Path(checkpoint)
    state_dict = load_state_dict(path, what="quality CLIP checkpoint")
    name = _register_config_beside(path) if architecture == AUTO_ARCHITECTURE else architecture
    if name not in open_clip.list_models():
        raise ValueError(
            f"Unknown open_clip architecture '{name}'. Choose one of open_clip.list_models() (e.g. 'ViT-B-16'), "
            f"or 'auto' with a model config JSON beside the checkpoint."
        )
    model = open_clip.create_model(name, pretrained=None, device="cpu")
    if any(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    expected = model.state_dict()
    details = state_dict_mismatch(state_dict, expected)
    if details:
        raise ValueError(
            f"Checkpoint '{path.name}' does not match architecture '{name}': {details}. Choose the architecture "
            f"the checkpoint was trained as (OpenAI weights need the '-quickgelu' variant's name only for "
            f"activation, not keys), or 'auto' with its config JSON beside it."
        )
    model.load_state_dict(state_dict, strict=True)
    logger.info("Loaded quality CLIP '%s' from %s", name, path)
    return SurgeryCLIP(model, name, surgery_depth=surgery_depth).to(device)
