"""HPSv2 / HPSv2.1 (Wu et al. 2023, "Human Preference Score v2"), loaded from the release checkpoint, offline.

Format: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` is a torch pickle ``{"state_dict": <open_clip ViT-H-14
state dict>}`` (read with ``torch.load(weights_only=True)``: no code runs); a ``.safetensors`` file holding the same
state dict is read too. The architecture is open_clip's "ViT-H-14" unless told otherwise (tests use a tiny config).

Score, as HPSv2's ``score.py`` (tgxs002/HPSv2, ``hpsv2/img_score.py``): ``diag(image_features @ text_features.T)`` with
both L2-normalised (``model(image, text)`` returns normalised features) and *no* logit scale, i.e. the cosine of each
image with its own prompt, in [-1, 1] (trained models give about 0.2-0.3). Preprocessing is HPSv2's
``preprocess_val``: longest side to 224 and black padding to a square (:func:`..preprocessing.hpsv2_preprocess`),
not open_clip's shortest-side crop, so no part of the image is cut away.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .base import DEFAULT_BATCH_SIZE
from .clip_score import Architecture, OpenClipReward, load_open_clip, open_clip_tokenizer
from .preprocessing import hpsv2_preprocess

HPSV2_ARCHITECTURE = "ViT-H-14"


class HPSv2Reward(OpenClipReward):
    """HPSv2 score: cos(image, prompt) of an open_clip CLIP fine-tuned on human preferences, in [-1, 1]."""

    kind = "hpsv2"


def load_hpsv2(
    checkpoint: str | os.PathLike,
    architecture: Architecture = HPSV2_ARCHITECTURE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> HPSv2Reward:
    """Load an HPSv2 checkpoint (``.pt`` with a ``state_dict`` entry, or ``.safetensors``).

    architecture: open_clip model name (default "ViT-H-14"), "auto" (config JSON beside the file) or a config dict.
    state_dict: the already-read state dict (skips reading ``checkpoint`` again). Returns a frozen
    :class:`HPSv2Reward` on the CPU in float32 (the release file is float16; ``.to(device, torch.float16)`` for speed).
    """
    model, name, config = load_open_clip(checkpoint, architecture, state_dict, what="HPSv2 checkpoint")
    reward = HPSv2Reward(model, open_clip_tokenizer(name, config), Path(checkpoint).stem,
                         hpsv2_preprocess(model.visual.image_size), batch_size)
    return reward.eval().requires_grad_(False)
