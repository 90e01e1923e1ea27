"""LAION aesthetic predictors: a small head on the L2-normalised CLIP image embedding. The score ignores prompts.

Two head formats, told apart by their state-dict keys (:func:`aesthetic_head_format`):

- "mlp", christophschuhmann/improved-aesthetic-predictor (``sac+logos+ava1-l14-linearMSE.pth``): ``layers`` =
  Linear(D, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16),
  Linear(16, 1), i.e. keys ``layers.{0,2,4,6,7}.{weight,bias}`` (hidden widths are read from the file);
- "linear", LAION-AI/aesthetic-predictor (``sa_0_4_vit_l_14_linear.pth``): one Linear(D, 1), keys ``weight``, ``bias``.

Both were fit on ``normalized(clip_model.encode_image(image))`` of OpenAI CLIP ViT-L/14 (D = 768), which is what this
module feeds them: the open_clip tower (a second local file, e.g. ViT-L-14-quickgelu with OpenAI weights) embeds the
image with open_clip's preprocessing, the embedding is L2-normalised, the head maps it to a score (about 1-10 for the
MLP head, trained on 1-10 ratings). Prompts are not used: ``score(images, prompts)`` accepts any prompts, or None.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from ..clip_surgery import AUTO_ARCHITECTURE
from ..weights import load_state_dict
from .base import DEFAULT_BATCH_SIZE, RewardModel, example_keys, guess_model_family
from .clip_score import Architecture, load_open_clip
from .preprocessing import open_clip_preprocess

logger = logging.getLogger(__name__)

MLP_LAYER_INDICES = (0, 2, 4, 6, 7)
MLP_DROPOUTS = (0.2, 0.2, 0.1)
MLP_HEAD_KEYS = frozenset(f"layers.{index}.{part}" for index in MLP_LAYER_INDICES for part in ("weight", "bias"))
LINEAR_HEAD_KEYS = frozenset({"weight", "bias"})


def aesthetic_head_format(keys) -> str | None:
    """"mlp" or "linear" when ``keys`` are exactly one of the two head layouts (module docstring), else None."""
    keys = frozenset(keys)
    if keys == MLP_HEAD_KEYS:
        return "mlp"
    if keys == LINEAR_HEAD_KEYS:
        return "linear"
    return None


class AestheticMLP(torch.nn.Module):
    """The improved-aesthetic-predictor MLP; ``widths`` = (D, 1024, 128, 64, 16) in the release. (N, D) -> (N, 1)."""

    def __init__(self, widths: tuple[int, int, int, int, int]):
        super().__init__()
        d, h1, h2, h3, h4 = widths
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(d, h1), torch.nn.Dropout(MLP_DROPOUTS[0]),
            torch.nn.Linear(h1, h2), torch.nn.Dropout(MLP_DROPOUTS[1]),
            torch.nn.Linear(h2, h3), torch.nn.Dropout(MLP_DROPOUTS[2]),
            torch.nn.Linear(h3, h4),
            torch.nn.Linear(h4, 1),
        )  # keys layers.{0,2,4,6,7}

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def build_aesthetic_head(state_dict: Mapping[str, torch.Tensor], source: str = "aesthetic head") -> torch.nn.Module:
    """The head module for a state dict in either format, with its weights loaded (eval mode).

    Raises ValueError naming the unexpected keys (and the model family they look like) when the keys are neither
    format, and naming the shapes when the layers do not chain.
    """
    head_format = aesthetic_head_format(state_dict)
    if head_format is None:
        family = guess_model_family(state_dict)
        raise ValueError(
            f"'{source}' is not an aesthetic head: its keys {example_keys(state_dict, 5)}"
            f"{f' look like {family}' if family else ''}. Expected the improved-aesthetic-predictor MLP "
            f"(keys {sorted(MLP_HEAD_KEYS)[:3]} ...) or a linear head (keys ['bias', 'weight'])."
        )
    if head_format == "linear":
        weight = state_dict["weight"]
        if weight.ndim != 2 or weight.shape[0] != 1:
            raise ValueError(f"'{source}': a linear aesthetic head needs weight (1, D), got {tuple(weight.shape)}.")
        head = torch.nn.Linear(weight.shape[1], 1)
    else:
        weights = [state_dict[f"layers.{index}.weight"] for index in MLP_LAYER_INDICES]
        if any(weight.ndim != 2 for weight in weights):
            raise ValueError(f"'{source}': MLP head weights must be 2-D, got {[tuple(w.shape) for w in weights]}.")
        widths = (weights[0].shape[1],) + tuple(int(weight.shape[0]) for weight in weights[:-1])
        expected = [(widths[i + 1] if i < 4 else 1, widths[i]) for i in range(5)]
        if any(tuple(weight.shape) != shape for weight, shape in zip(weights, expected)) or weights[-1].shape[0] != 1:
            raise ValueError(
                f"'{source}': the MLP head's layers do not chain: weight shapes "
                f"{[tuple(weight.shape) for weight in weights]}, expected (out, in) pairs ending in (1, 16)."
            )
        head = AestheticMLP(widths)
    try:
        head.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as error:  # a bias of the wrong length
        raise ValueError(f"'{source}': the head's tensors have inconsistent shapes ({error}).") from error
    return head.eval()


class AestheticReward(RewardModel):
    """Aesthetic score ``head(normalize(visual(image)))``; prompts ignored (module docstring)."""

    kind = "aesthetic"
    uses_prompts = False

    def __init__(self, visual: torch.nn.Module, head: torch.nn.Module, name: str, preprocess,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        super().__init__(name, preprocess, batch_size)
        self.visual = visual
        self.head = head

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) -> (N, D) L2-normalised CLIP image embeddings (float32)."""
        return F.normalize(self.visual(pixels).float(), dim=-1)

    def combine(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor | None) -> torch.Tensor:
        """(N, D) -> (N,) head outputs; ``text_embeddings`` is None (prompt-free)."""
        head_dtype = next(self.head.parameters()).dtype
        return self.head(image_embeddings.to(head_dtype)).squeeze(-1)


def load_aesthetic(
    head: str | os.PathLike,
    tower: str | os.PathLike,
    tower_architecture: Architecture = AUTO_ARCHITECTURE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    head_state_dict: Mapping[str, torch.Tensor] | None = None,
) -> AestheticReward:
    """Load an aesthetic head file and the open_clip CLIP checkpoint it was fit on (two local files).

    head: ``.pth`` (read with ``weights_only=True``) or ``.safetensors`` in either format. tower: an open_clip CLIP
    checkpoint (only its image tower is kept); tower_architecture: open_clip name, "auto" (config JSON beside the
    tower) or a config dict. head_state_dict: the already-read head (skips reading ``head`` again).
    Raises ValueError when the head's input width differs from the tower's embedding width.
    """
    head_path = Path(head)
    if head_state_dict is None:
        head_state_dict = load_state_dict(head_path, what="aesthetic head")
    head_module = build_aesthetic_head(head_state_dict, head_path.name)
    model, name, config = load_open_clip(tower, tower_architecture, what="aesthetic CLIP tower")
    first_layer = head_module if isinstance(head_module, torch.nn.Linear) else head_module.layers[0]
    head_width = first_layer.in_features
    if head_width != int(config["embed_dim"]):
        raise ValueError(
            f"The aesthetic head '{head_path.name}' takes {head_width}-dim CLIP embeddings (768 = OpenAI ViT-L/14, "
            f"as LAION's heads), but the tower '{Path(tower).name}' ({name or 'custom config'}) gives "
            f"{config['embed_dim']}-dim ones. Choose the CLIP tower the head was fit on."
        )
    logger.info("Loaded aesthetic head %s on tower %s", head_path, tower)
    reward = AestheticReward(model.visual, head_module, head_path.stem, open_clip_preprocess(model.visual.image_size),
                             batch_size)
    return reward.eval().requires_grad_(False)
