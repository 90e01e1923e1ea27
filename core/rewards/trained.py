"""Our own trained CLIP rewards (Stable Preference trainer): the "reward-clip/1" safetensors format, save and load.

Format: ``<name>.safetensors`` = the full open_clip CLIP ``model.state_dict()``, with safetensors metadata (all str):

- ``refinery.format`` = "reward-clip/1"
- ``refinery.method`` = "stable-preference" (the training method)
- ``refinery.open_clip_config`` = JSON of the open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...)
- ``refinery.architecture`` = the open_clip model name, or "" for a config that is not one of open_clip's own
- ``refinery.score`` = "cosine": score = cos(image_embedding, text_embedding), in [-1, 1], as HPSv2
- ``refinery.training`` = JSON of the training configuration (free-form)

The loader rebuilds the model from the stored config alone (no JSON beside the file, no architecture argument) and
preprocesses as the trainer does: open_clip's shortest-side resize and centre crop, OpenAI mean/std.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..open_clip_files import build_open_clip, check_open_clip_config, load_open_clip_weights, open_clip_tokenizer
from ..weights import load_state_dict, save_safetensors_atomic, state_dict_mismatch
from .base import DEFAULT_BATCH_SIZE
from .clip_score import OpenClipReward

logger = logging.getLogger(__name__)

REWARD_FORMAT = "reward-clip/1"
DEFAULT_METHOD = "stable-preference"
SCORE_COSINE = "cosine"
KEY_FORMAT = "refinery.format"
KEY_METHOD = "refinery.method"
KEY_CONFIG = "refinery.open_clip_config"
KEY_ARCHITECTURE = "refinery.architecture"
KEY_SCORE = "refinery.score"
KEY_TRAINING = "refinery.training"


def trained_reward_metadata(
    config_dict: Mapping[str, Any], architecture: str, training: Mapping[str, Any] | str, method: str = DEFAULT_METHOD
) -> dict[str, str]:
    """The metadata block of a "reward-clip/1" file (module docstring). ``training`` may be a dict (written as JSON;
    values JSON cannot hold, such as paths, are written as strings) or an already-serialised string."""
    check_open_clip_config(config_dict, "config_dict")
    return {
        KEY_FORMAT: REWARD_FORMAT,
        KEY_METHOD: method,
        KEY_CONFIG: json.dumps(dict(config_dict), sort_keys=True),
        KEY_ARCHITECTURE: architecture or "",
        KEY_SCORE: SCORE_COSINE,
        KEY_TRAINING: training if isinstance(training, str) else json.dumps(dict(training), sort_keys=True, default=str),
    }


def _check_state_dict_fits(state_dict: Mapping[str, torch.Tensor], config_dict: Mapping[str, Any]) -> None:
    """Build the config's model on the meta device (no memory) and compare keys and shapes, so a file that would not
    load is refused at save time rather than after training."""
    with torch.device("meta"):
        reference = build_open_clip(config_dict).state_dict()
    details = state_dict_mismatch(state_dict, reference)
    if details:
        raise ValueError(
            f"The model does not match its config_dict: {details}. Pass the unwrapped open_clip model (no DDP "
            f"'module.' or torch.compile '_orig_mod.' prefix) and the config it was built from."
        )


def save_trained_reward(
    model: torch.nn.Module,
    config_dict: Mapping[str, Any],
    path: str | os.PathLike,
    architecture: str,
    training: Mapping[str, Any] | str,
    method: str = DEFAULT_METHOD,
) -> Path:
    """Save an open_clip CLIP reward as "reward-clip/1" safetensors, atomically (temporary file, then ``os.replace``).

    model: the open_clip CLIP (unwrapped); config_dict: its open_clip model config; path: the ``.safetensors`` file;
    architecture: its open_clip model name, or "" for a custom config; training: the training configuration (dict or
    JSON string); method: the training method. Checks that the state dict fits ``config_dict`` before writing.
    Returns the path.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"A trained reward is saved as .safetensors, got '{path.name}'.")
    metadata = trained_reward_metadata(config_dict, architecture, training, method)
    state_dict = model.state_dict()
    _check_state_dict_fits(state_dict, config_dict)
    saved = save_safetensors_atomic(state_dict, path, metadata)
    logger.info("Saved the trained reward to %s", saved)
    return saved


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file ({} when it has none), without reading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The reward file '{path}' does not exist. Check the path or the model folder.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises several private error types
        raise ValueError(f"'{path.name}' is not a readable safetensors file ({error}).") from error


def parse_trained_reward_metadata(metadata: Mapping[str, str], source: str) -> tuple[dict, str]:
    """``(open_clip config, architecture)`` from a "reward-clip/1" metadata block; ValueError naming what is wrong."""
    found = metadata.get(KEY_FORMAT)
    if found != REWARD_FORMAT:
        newer = isinstance(found, str) and found.startswith("reward-clip/")
        raise ValueError(
            f"'{source}' has format {found!r}; this loader reads {REWARD_FORMAT!r}"
            + (": it was written by a newer version of the pack, update it." if newer else ".")
        )
    score = metadata.get(KEY_SCORE, SCORE_COSINE)
    if score != SCORE_COSINE:
        raise ValueError(f"'{source}' asks for the score {score!r}; only {SCORE_COSINE!r} is known. Update the pack.")
    try:
        config = json.loads(metadata[KEY_CONFIG])
    except (KeyError, ValueError) as error:
        raise ValueError(f"'{source}' lacks a readable {KEY_CONFIG} entry ({error}): the file is damaged.") from error
    check_open_clip_config(config, f"The {KEY_CONFIG} of '{source}'")
    return config, metadata.get(KEY_ARCHITECTURE, "")


class TrainedClipReward(OpenClipReward):
    """A "reward-clip/1" reward: cos(image, prompt) in [-1, 1]. ``metadata`` holds the file's metadata (method,
    training configuration) for reports."""

    kind = "trained"

    def __init__(self, model, tokenizer, name: str, metadata: Mapping[str, str], batch_size: int = DEFAULT_BATCH_SIZE):
        super().__init__(model, tokenizer, name, batch_size=batch_size)
        self.metadata = dict(metadata)


def load_trained_reward(path: str | os.PathLike, batch_size: int = DEFAULT_BATCH_SIZE) -> TrainedClipReward:
    """Load a "reward-clip/1" file written by :func:`save_trained_reward`. Returns a frozen reward on the CPU."""
    path = Path(path)
    metadata = read_safetensors_metadata(path)
    config, architecture = parse_trained_reward_metadata(metadata, path.name)
    model = build_open_clip(config)
    state_dict = load_state_dict(path, what="trained reward")
    load_open_clip_weights(model, state_dict, path.name, architecture or "custom config")
    tokenizer = open_clip_tokenizer(architecture, config)
    logger.info("Loaded trained reward %s (%s)", path, metadata.get(KEY_METHOD, "?"))
    reward = TrainedClipReward(model.eval(), tokenizer, path.stem, metadata, batch_size)
    return reward.eval().requires_grad_(False)
