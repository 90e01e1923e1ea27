"""``load_reward_model(path, kind="auto", **options)``: one entry point for every reward format, offline.

Kinds and their options (each loader's own keyword arguments):

- "clip-score" (:func:`.clip_score.load_clip_score`): an open_clip checkpoint; ``architecture``, ``weight``,
  ``prompt_prefix``, ``image_mean``, ``image_std``;
- "hpsv2" (:func:`.hpsv2.load_hpsv2`): ``HPS_v2*.pt`` (or ``.safetensors``); ``architecture`` (default "ViT-H-14");
- "pickscore" (:func:`.pickscore.load_pickscore`): a transformers CLIPModel folder; ``processor_folder``;
- "aesthetic" (:func:`.aesthetic.load_aesthetic`): the head file; ``tower`` (required), ``tower_architecture``;
- "trained" (:func:`.trained.load_trained_reward`): a "reward-clip/1" safetensors file;

all take ``batch_size``. "auto" reads the layout (:func:`detect_reward_kind`):

- a folder whose ``config.json`` has ``model_type`` "clip" -> "pickscore";
- a ``.safetensors`` file with ``refinery.format`` metadata -> "trained";
- a torch file ``{"state_dict": <open_clip CLIP>}`` -> "hpsv2" (the HPSv2 release layout);
- aesthetic-head keys -> "aesthetic" (the ``tower`` option is then required);
- a bare open_clip CLIP state dict is either a plain CLIP or a converted HPSv2, so "auto" asks for the kind.

Every file is read without running pickled code (safetensors, or ``torch.load(weights_only=True)``), and read once.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path

from ..open_clip_files import is_open_clip_state_dict
from ..weights import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, read_state_dict
from .aesthetic import aesthetic_head_format, load_aesthetic
from .base import REWARD_KINDS, RewardModel, example_keys, guess_model_family
from .clip_score import load_clip_score
from .hpsv2 import load_hpsv2
from .pickscore import EXPECTED_LAYOUT, load_pickscore
from .trained import KEY_FORMAT, load_trained_reward, read_safetensors_metadata

AUTO_KIND = "auto"
LOADERS = {
    "clip-score": load_clip_score,
    "hpsv2": load_hpsv2,
    "pickscore": load_pickscore,
    "aesthetic": load_aesthetic,
    "trained": load_trained_reward,
}
_PRELOADED_OPTION = {"clip-score": "state_dict", "hpsv2": "state_dict", "aesthetic": "head_state_dict"}
"""The loader argument that takes a state dict "auto" has already read (so the file is read once)."""


def _not_a_reward(path: Path, keys) -> ValueError:
    family = guess_model_family(keys)
    return ValueError(
        f"'{path.name}' is not a reward model"
        + (f": it looks like {family}" if family else "")
        + f" (keys such as {example_keys(keys)}). Reward files are an HPSv2 checkpoint, an open_clip CLIP, an "
        f"aesthetic head, a trained reward (reward-clip/1 safetensors), or a PickScore folder."
    )


def _ambiguous_clip(path: Path) -> ValueError:
    return ValueError(
        f"'{path.name}' is an open_clip CLIP state dict without reward metadata: it may be a plain CLIP (kind="
        f"'clip-score') or an HPSv2 checkpoint converted to this file type (kind='hpsv2'). Choose the kind."
    )


def _detect_folder(path: Path) -> str:
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"The folder '{path}' is not a reward model folder: a PickScore folder holds {EXPECTED_LAYOUT}. Reward "
            f"files (HPSv2 .pt, open_clip or trained .safetensors, aesthetic heads) are given as files."
        )
    return "pickscore"  # load_pickscore checks model_type "clip" and names what it found


def _detect_file(path: Path) -> tuple[str, dict | None]:
    """``(kind, state_dict or None)``: a torch file is read here (once) and its state dict handed on."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        if KEY_FORMAT in read_safetensors_metadata(path):
            return "trained", None
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
        if aesthetic_head_format(keys):
            return "aesthetic", None
        if is_open_clip_state_dict(keys):
            raise _ambiguous_clip(path)
        raise _not_a_reward(path, keys)
    if suffix in TORCH_SUFFIXES:
        state_dict, wrapped = read_state_dict(path, what="reward model file")  # wrapped: the HPSv2 layout
        if aesthetic_head_format(state_dict):
            return "aesthetic", state_dict
        if is_open_clip_state_dict(state_dict):
            if wrapped:
                return "hpsv2", state_dict
            raise _ambiguous_clip(path)
        raise _not_a_reward(path, state_dict)
    raise ValueError(
        f"'{path.name}' has the extension '{path.suffix}'; reward files are {SAFETENSORS_SUFFIXES + TORCH_SUFFIXES} "
        f"or a PickScore folder."
    )


def detect_reward_kind(path: str | os.PathLike) -> str:
    """The reward kind of a file or folder from its layout (module docstring); FileNotFoundError or ValueError
    with what was expected otherwise."""
    return _detect(Path(path))[0]


def _detect(path: Path) -> tuple[str, dict | None]:
    if not path.exists():
        raise FileNotFoundError(f"The reward model '{path}' does not exist. Check the path or the model folder.")
    if path.is_dir():
        return _detect_folder(path), None
    return _detect_file(path)


def _check_options(kind: str, options: Mapping) -> None:
    accepted = [name for name in inspect.signature(LOADERS[kind]).parameters][1:]
    accepted = [name for name in accepted if name != _PRELOADED_OPTION.get(kind)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"Option(s) {unknown} do not apply to reward kind '{kind}'; it takes {accepted}.")
    if kind == "aesthetic" and options.get("tower") is None:
        raise ValueError(
            "An aesthetic head needs the CLIP image tower it was fit on: pass tower=<open_clip checkpoint> (for LAION's "
            "heads, OpenAI ViT-L/14, e.g. with tower_architecture='ViT-L-14-quickgelu')."
        )


def load_reward_model(path: str | os.PathLike, kind: str = AUTO_KIND, **options) -> RewardModel:
    """Load a reward model from a local file or folder, never downloading.

    path: the reward's file (or PickScore folder). kind: "auto" or one of :data:`.base.REWARD_KINDS`. options: the
    kind's loader arguments (module docstring). Returns a frozen :class:`.base.RewardModel` on the CPU; move it with
    ``.to(device)``. Raises FileNotFoundError naming a missing path, ValueError for files of another model family,
    unknown kinds or options, and layouts "auto" cannot decide.
    """
    path = Path(path)
    if kind != AUTO_KIND and kind not in LOADERS:
        raise ValueError(f"Unknown reward kind {kind!r}; choose 'auto' or one of {list(REWARD_KINDS)}.")
    preloaded = None
    if kind == AUTO_KIND:
        kind, preloaded = _detect(path)
    elif not path.exists():
        raise FileNotFoundError(f"The {kind} reward model '{path}' does not exist. Check the path or the model folder.")
    _check_options(kind, options)
    if preloaded is not None and kind in _PRELOADED_OPTION:
        options[_PRELOADED_OPTION[kind]] = preloaded
    return LOADERS[kind](path, **options)
