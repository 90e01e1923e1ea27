"""CLIP-Surgery image encoder over any open_clip ViT, loaded offline from a local checkpoint.

g-refine.txt eq. 1 (and CLIP Surgery, ref. [23] of that paper): in the last ``surgery_depth`` transformer
blocks the patch tokens take a second path whose self-attention uses the value projection as query, key and
value, ``softmax(V V^T / sqrt(d)) V``, skips the FFN, and is added residually. As in the CLIP-Surgery
reference code, the second path's attention reads the *original* path's hidden states (``ln_1`` of the
block input), so the original path, and with it the CLS embedding, is exactly the unmodified model's.

Checkpoints (open_clip state dicts, transformers ``CLIPModel`` weights) and architectures are read by
:mod:`.open_clip_files`, the one open_clip loader.

Conventions: image tensors handed to :meth:`SurgeryCLIP.preprocess` are ComfyUI-style ``(B, H, W, 3)`` float
in [0, 1]; features returned are L2-normalised.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .open_clip_files import AUTO_ARCHITECTURE, Architecture, load_open_clip_model

TEXT_CACHE_SIZE = 4096
"""Text features a :class:`SurgeryCLIP` keeps (least recently used dropped first): D floats each (2 KiB at D = 512)."""
IMAGE_CACHE_SIZE = 16
"""Image batches whose :class:`ImageFeatures` a :class:`SurgeryCLIP` keeps for ``encode_image(..., cached=True)`` (the
quality-map nodes ask in chunks of 8 images: about 3 MiB per chunk for ViT-B/16, 9 MiB for ViT-H/14), on the CPU."""


class LruCache:
    """A mapping of at most ``capacity`` entries that drops the least recently used one first."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"An LRU cache needs a capacity >= 1, got {capacity}.")
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def get(self, key, default=None):
        """The value of ``key`` (now the most recently used), or ``default``."""
        if key not in self._entries:
            return default
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key, value) -> None:
        """Store ``value`` under ``key`` as the most recently used entry, dropping the oldest beyond capacity."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def map_values(self, function) -> None:
        """Replace every value ``v`` by ``function(v)`` (e.g. move tensors to a device), keeping the order."""
        for key, value in self._entries.items():
            self._entries[key] = function(value)


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

    def to(self, device) -> "ImageFeatures":
        """The same features on ``device``."""
        return ImageFeatures(self.cls_embedding.to(device), self.patch_features.to(device), self.image_size)


def pixel_key(images: torch.Tensor) -> tuple:
    """A key that is equal for two image batches exactly when their pixels are: shape, dtype and a BLAKE2b digest of
    the bytes (about 1 GB/s on a CPU, so a few ms per 512x512 picture against a forward of hundreds)."""
    pixels = images.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(pixels.reshape(-1).view(torch.uint8).numpy(), digest_size=16).hexdigest()
    return tuple(pixels.shape), str(pixels.dtype), digest


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


DEFAULT_SURGERY_DEPTH = 6
"""Blocks on the surgery path by default: the CLIP Surgery reference code's last 6, for ViT-B, -L and -H alike."""


class SurgeryCLIP:
    """An open_clip ViT CLIP with a CLIP-Surgery image path and cached text features.

    Build it with :func:`load_quality_clip` (from a file) or directly from an open_clip model (tests).
    ``surgery_depth`` defaults to the last ``DEFAULT_SURGERY_DEPTH`` = 6 blocks whatever the tower's depth, as the
    CLIP Surgery reference code does (METHODS.md 1.1; all of them for a tower of 6 blocks or fewer).
    ``tokenizer`` defaults to open_clip's tokenizer of ``architecture`` (pass one for a model whose architecture is
    not one of open_clip's names, e.g. a converted transformers CLIP).
    """

    def __init__(self, model, architecture: str, surgery_depth: int | None = None, tokenizer=None):
        """model: an open_clip CLIP with a ViT image tower (CLS pooling, fused-QKV ``nn.MultiheadAttention`` blocks);
        architecture: its name, for messages (and the default tokenizer). ValueError for other towers."""
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
            if not isinstance(attention, torch.nn.MultiheadAttention) or attention.in_proj_weight is None \
                    or attention.bias_k is not None or attention.add_zero_attn or hasattr(block, "ln_1_kv"):
                raise ValueError(
                    f"Architecture '{architecture}' uses {type(attention).__name__} attention blocks; CLIP-Surgery "
                    f"needs the standard fused-QKV nn.MultiheadAttention blocks of open_clip's ViT."
                )
        depth = min(DEFAULT_SURGERY_DEPTH, len(blocks)) if surgery_depth is None else int(surgery_depth)
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
        self._text_cache = LruCache(TEXT_CACHE_SIZE)  # text -> (D,) features, on self.device
        self._image_cache = LruCache(IMAGE_CACHE_SIZE)  # (surgery blocks, pixel_key) -> ImageFeatures on the CPU

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
        self._text_cache.map_values(lambda features: features.to(device))
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
    def encode_image(self, images: torch.Tensor, use_surgery: bool = True, cached: bool = False) -> ImageFeatures:
        """images: (B, H, W, 3) float in [0, 1] -> :class:`ImageFeatures` from one forward (g-refine.txt eq. 1).

        use_surgery=False gives the plain CLIP patch tokens of the original path instead (the ablation of G-Refine's
        Fig. 4 "original image encoder"); the CLS embedding is the same either way. cached=True looks the batch up
        by its pixels (:func:`pixel_key`) among the last :data:`IMAGE_CACHE_SIZE` batches this encoder encoded with
        ``cached=True``, so separate map nodes on the same picture share one forward (ARCHITECTURE.md).
        """
        if not cached:
            return self._encode_image(images, use_surgery)
        key = (self.surgery_depth if use_surgery else 0, pixel_key(images))  # surgery blocks (0: plain tokens)
        features = self._image_cache.get(key)
        if features is None:
            features = self._encode_image(images, use_surgery)
            self._image_cache.put(key, features.to("cpu"))
            return features
        return features.to(self.device)

    def _encode_image(self, images: torch.Tensor, use_surgery: bool) -> ImageFeatures:
        """The forward of :meth:`encode_image`. The original path runs every block as the model does, except where
        its result is never read: with ``use_surgery`` the last block's attention queries, attention output and FFN
        are computed for the CLS token only (the patch tokens' own outputs there feed nothing), and the surgery
        blocks reuse the value projection the original attention computes (:func:`_surgery_block`)."""
        visual = self.model.visual
        x = visual._embeds(self.preprocess(images))  # (B, 1 + gh*gw, width), ln_pre applied
        transformer = visual.transformer
        blocks = transformer.resblocks
        first_surgery_block = len(blocks) - self.surgery_depth if use_surgery else len(blocks)
        if not transformer.batch_first:
            x = x.transpose(0, 1)  # (B, L, width) -> (L, B, width), the blocks' layout
        for block in blocks[:first_surgery_block]:
            x = block(x)
        if not transformer.batch_first:
            x = x.transpose(0, 1)  # -> (B, L, width)
        surgery = x[:, 1:]  # (B, gh*gw, width): the surgery path of the patch tokens
        for index in range(first_surgery_block, len(blocks)):
            x, update = _surgery_block(blocks[index], x, cls_only=index == len(blocks) - 1)
            surgery = surgery + update  # FFN skipped on the surgery path
        pooled, _ = visual._pool(x)  # CLS on the original path (x is (B, 1, width) after the last surgery block)
        patches = visual.ln_post(surgery if use_surgery else x[:, 1:])  # (B, gh*gw, width)
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
        """texts: N strings -> (N, D) L2-normalised text features; cached per text for this model (the last
        :data:`TEXT_CACHE_SIZE` texts).

        Text longer than the tower's context is truncated by the tokenizer (the caller warns; see
        :meth:`count_tokens`).
        """
        found = {text: self._text_cache.get(text) for text in dict.fromkeys(texts)}
        missing = [text for text, features in found.items() if features is None]
        if missing:
            tokens = self.tokenizer(missing).to(self.device)
            features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)  # (M, D)
            for text, row in zip(missing, features):
                found[text] = row
                self._text_cache.put(text, row)
        return torch.stack([found[text] for text in texts]) if texts else torch.zeros(0)

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


def _heads(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, width) -> (B, heads, L, width / heads)."""
    batch, length, width = tokens.shape
    return tokens.view(batch, length, heads, width // heads).transpose(1, 2)


def _merge_heads(tokens: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, head_dim) -> (B, L, heads * head_dim)."""
    batch, heads, length, head_dim = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, length, heads * head_dim)


def _surgery_block(block, x: torch.Tensor, cls_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One open_clip ``ResidualAttentionBlock`` on the original path, and the update it adds to the surgery path.

    x: (B, L, width) block input, token 0 = CLS. Returns (the block output: (B, L, width), or (B, 1, width) for the
    CLS token alone when ``cls_only``; the surgery update (B, L - 1, width) of the patch tokens). The original path
    is the block's own computation, ``x + attn(ln_1(x))`` then ``+ mlp(ln_2(.))``, written out so that its value
    projection V also serves the surgery path: the V-V self-attention of g-refine.txt eq. 1,
    ``out_proj(softmax(V V^T / sqrt(head_dim)) V)`` per head, q = k = v = V of ``ln_1(x)``, read by the patch tokens
    over all tokens, without FFN.
    """
    attention = block.attn
    width, heads = attention.embed_dim, attention.num_heads
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    hidden = block.ln_1(x)
    if cls_only:
        queries = F.linear(hidden[:, :1], weight[:width], None if bias is None else bias[:width])  # (B, 1, width)
        keys, values = F.linear(hidden, weight[width:], None if bias is None else bias[width:]).chunk(2, dim=-1)
        x = x[:, :1]
    else:
        queries, keys, values = F.linear(hidden, weight, bias).chunk(3, dim=-1)  # 3 x (B, L, width)
    queries, keys, values = _heads(queries, heads), _heads(keys, heads), _heads(values, heads)
    if cls_only:  # one query, written out as products and sums: for a lone query, SDPA's CPU kernel and batched
        # matmul both give results that depend on the image's place in the batch (a picture must get the same features
        # anywhere in a batch)
        scores = (queries * keys).sum(dim=-1) / math.sqrt(width // heads)  # (B, heads, L): one score per key
        attended = (scores.softmax(dim=-1)[..., None] * values).sum(dim=-2, keepdim=True)  # (B, heads, 1, head_dim)
    else:
        attended = F.scaled_dot_product_attention(queries, keys, values)  # (B, heads, L, head_dim)
    surgery = F.scaled_dot_product_attention(values[:, :, 1:], values, values)  # (B, heads, L - 1, head_dim)
    x = x + block.ls_1(attention.out_proj(_merge_heads(attended)))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, block.ls_1(attention.out_proj(_merge_heads(surgery)))


def load_quality_clip(
    checkpoint: str | os.PathLike,
    architecture: Architecture = AUTO_ARCHITECTURE,
    surgery_depth: int | None = None,
    device: str | torch.device = "cpu",
) -> SurgeryCLIP:
    """Load an open_clip ViT from a local checkpoint (never downloads) and wrap it as :class:`SurgeryCLIP`.

    checkpoint and architecture: as :func:`.open_clip_files.load_open_clip_model` reads them (open_clip state dicts
    with ``<stem>.json`` beside them for ``"auto"``, transformers CLIPModel folders or files, an open_clip name or
    config dict). ValueError for towers CLIP-Surgery cannot apply to (not a ViT, not CLS-pooled).
    """
    loaded = load_open_clip_model(checkpoint, architecture, what="quality CLIP checkpoint")
    return SurgeryCLIP(loaded.model, loaded.label, surgery_depth=surgery_depth, tokenizer=loaded.tokenizer()).to(device)
