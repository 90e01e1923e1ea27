"""CLIPScore on any open_clip model, and the reward over an open_clip CLIP shared by HPSv2 and trained rewards.

CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", eq. 1):
``CLIP-S(c, v) = w * max(cos(c, v), 0)`` with ``w = 2.5``, which stretches the cosines of ViT-B/32 (rarely above
0.4) to about [0, 1]. Range [0, w]. Hessel's reference code prefixes every caption with "A photo depicts "; that is
the ``prompt_prefix`` option here, off by default because our prompts are generation prompts, not captions
(torchmetrics' CLIPScore, another common reading, uses w = 100 and no prefix: pass ``weight=100``).

Checkpoints load offline through :mod:`..open_clip_files` (one local file or transformers folder, the architecture
an open_clip model name, ``"auto"`` with a config beside the checkpoint, or a config dict). Any open_clip tower works
(ViT, ConvNeXt, ...); only CoCa (``multimodal_cfg``) is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from ..open_clip_files import AUTO_ARCHITECTURE, Architecture, load_open_clip_model, open_clip_tokenizer
from .base import DEFAULT_BATCH_SIZE, RewardModel
from .preprocessing import ImagePreprocess, open_clip_preprocess

CLIP_SCORE_WEIGHT = 2.5
"""w of CLIPScore (Hessel et al. 2021, sec. 3)."""


def load_open_clip(
    checkpoint: str | os.PathLike,
    architecture: Architecture = AUTO_ARCHITECTURE,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    what: str = "open_clip checkpoint",
) -> tuple[torch.nn.Module, str, dict]:
    """``(model, name, config)`` of :func:`..open_clip_files.load_open_clip_model` (the one open_clip loader), the
    form the reward loaders unpack: the model on the CPU in float32 (eval mode), its open_clip name ("" for a config
    dict) and model config."""
    loaded = load_open_clip_model(checkpoint, architecture, state_dict, what)
    return loaded.model, loaded.name, loaded.config


# -- rewards over an open_clip model -----------------------------------------------------------------------------
class OpenClipReward(RewardModel):
    """A reward over an open_clip CLIP: L2-normalised image and text embeddings, score = cosine (subclasses change
    :meth:`combine`). model: an open_clip CLIP; tokenizer: its tokenizer; preprocess: defaults to open_clip's own
    ``image_transform(image_size, is_train=False)``."""

    kind = "clip-cosine"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        name: str,
        preprocess: ImagePreprocess | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        super().__init__(name, preprocess or open_clip_preprocess(model.visual.image_size), batch_size)
        self.model = model
        self.tokenizer = tokenizer

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) -> (N, D) L2-normalised image embeddings (float32)."""
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """N prompts -> (N, D) L2-normalised text embeddings (float32); text past the context is truncated."""
        tokens = self.tokenizer(prompts).to(self.device)  # (N, context_length)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def combine(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor | None) -> torch.Tensor:
        """cos(image, text) of each pair: (N, D), (N, D) -> (N,) in [-1, 1]."""
        return (image_embeddings * text_embeddings).sum(dim=-1)


class ClipScoreReward(OpenClipReward):
    """CLIPScore ``w * max(cos(image, prompt_prefix + prompt), 0)``, range [0, w] (module docstring)."""

    kind = "clip-score"

    def __init__(self, model, tokenizer, name: str, weight: float = CLIP_SCORE_WEIGHT, prompt_prefix: str = "",
                 preprocess: ImagePreprocess | None = None, batch_size: int = DEFAULT_BATCH_SIZE):
        super().__init__(model, tokenizer, name, preprocess, batch_size)
        self.weight = float(weight)
        self.prompt_prefix = prompt_prefix

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return super().encode_prompts([self.prompt_prefix + prompt for prompt in prompts])

    def combine(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor | None) -> torch.Tensor:
        return self.weight * super().combine(image_embeddings, text_embeddings).clamp(min=0.0)


def load_clip_score(
    checkpoint: str | os.PathLike,
    architecture: Architecture = AUTO_ARCHITECTURE,
    weight: float = CLIP_SCORE_WEIGHT,
    prompt_prefix: str = "",
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> ClipScoreReward:
    """CLIPScore over the open_clip checkpoint ``checkpoint`` (see :func:`load_open_clip` for ``architecture``).

    weight: w (2.5, Hessel et al.). prompt_prefix: text put before every prompt ("A photo depicts " in Hessel's code).
    image_mean, image_std: the checkpoint's normalisation when it is not OpenAI's (e.g. (0.5, 0.5, 0.5) for SigLIP).
    Returns a frozen :class:`ClipScoreReward` on the CPU.
    """
    model, name, config = load_open_clip(checkpoint, architecture, state_dict, what="CLIPScore checkpoint")
    preprocess = open_clip_preprocess(model.visual.image_size, image_mean, image_std)
    reward = ClipScoreReward(model, open_clip_tokenizer(name, config), Path(checkpoint).stem, weight, prompt_prefix,
                             preprocess, batch_size)
    return reward.eval().requires_grad_(False)
