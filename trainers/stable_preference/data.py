"""Preference pairs from a local ``pairs.jsonl``: strict reading with line-numbered errors, image loading, and
batches that are a fixed function of (seed, micro-batch index) so a resumed run sees exactly the same data.

Line formats (one JSON object per line; blank lines are skipped; other keys are kept out of the way and ignored):
- ``{"prompt": str, "preferred": path, "rejected": path}``;
- ``{"prompt": str, "image_0": path, "image_1": path, "label": 0 | 1}``, ``label`` = index of the preferred image
  (ties, label 0.5, are refused: the pairwise losses need a winner).
Paths are relative to the folder of the ``.jsonl`` file (absolute paths are used as they are).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..common.data import (DatasetError, LineItemDataset, StepBatchSampler, dataset_file, line_image, load_image,
                           read_json_lines)
from .config import DATASET_FILE

WHAT = "preference dataset"
__all__ = ["DatasetError", "PreferencePair", "PreferenceDataset", "StepBatchSampler", "collate",
           "load_image", "read_pairs"]


@dataclass(frozen=True)
class PreferencePair:
    """One pair. line: 1-based line number in the file (for messages)."""

    prompt: str
    preferred: Path
    rejected: Path
    line: int


def _parse_line(obj, number: int, root: Path) -> tuple[PreferencePair | None, list[str]]:
    """One decoded line -> (pair or None, problems)."""
    where = f"line {number}"
    if not isinstance(obj, dict):
        return None, [f"{where}: expected a JSON object, got {type(obj).__name__}"]
    if "preferred" in obj or "rejected" in obj:
        required, fmt = ("prompt", "preferred", "rejected"), "prompt/preferred/rejected"
    elif any(key in obj for key in ("image_0", "image_1", "label")):
        required, fmt = ("prompt", "image_0", "image_1", "label"), "prompt/image_0/image_1/label"
    else:
        return None, [f"{where}: needs the keys prompt, preferred, rejected (or prompt, image_0, image_1, label); "
                      f"found {sorted(obj)}"]
    missing = [key for key in required if key not in obj]
    if missing:
        return None, [f"{where}: missing key(s) {missing} for the {fmt} format"]
    problems = []
    prompt = obj["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    image_keys = ("preferred", "rejected") if "preferred" in required else ("image_0", "image_1")
    paths = {key: line_image(obj[key], root, f"'{key}' image", where, problems) for key in image_keys}
    if "label" in required:
        label = obj["label"]
        if isinstance(label, bool) or not isinstance(label, (int, float)) or label not in (0, 1):
            detail = " (ties are not supported: drop the line)" if label == 0.5 else ""
            problems.append(f"{where}: 'label' must be 0 or 1 (index of the preferred image), got {label!r}{detail}")
    if problems:
        return None, problems
    if "label" in required:
        first, second = paths["image_0"], paths["image_1"]
        preferred, rejected = (first, second) if obj["label"] == 0 else (second, first)
    else:
        preferred, rejected = paths["preferred"], paths["rejected"]
    if preferred.resolve() == rejected.resolve():
        return None, [f"{where}: both images are the same file '{preferred}'"]
    return PreferencePair(prompt, preferred, rejected, number), []


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Read and check every line of the dataset at ``path`` (folder or .jsonl); DatasetError listing all problems
    with their line numbers (malformed JSON, missing keys, bad values, missing image files) when any is found."""
    file = dataset_file(path, DATASET_FILE)
    pairs, problems = read_json_lines(file, lambda obj, number: _parse_line(obj, number, file.parent), WHAT)
    if not pairs and not problems:
        problems.append("no preference pairs in the file")
    if problems:
        raise DatasetError(file, problems, WHAT)
    return pairs


class PreferenceDataset(LineItemDataset):
    """Items ``{"prompt": str, "preferred": (3, H, W), "rejected": (3, H, W)}``, pixels in [0, 1] at
    ``image_size`` (H, W)."""

    def __init__(self, pairs: list[PreferencePair], image_size: tuple[int, int]):
        super().__init__(pairs)
        self.image_size = image_size

    def load(self, pair: PreferencePair) -> dict:
        return {"prompt": pair.prompt, "preferred": load_image(pair.preferred, self.image_size),
                "rejected": load_image(pair.rejected, self.image_size)}


def collate(items: list[dict]) -> dict:
    """-> ``{"prompts": [B str], "preferred": (B, 3, H, W), "rejected": (B, 3, H, W)}``."""
    return {
        "prompts": [item["prompt"] for item in items],
        "preferred": torch.stack([item["preferred"] for item in items]),
        "rejected": torch.stack([item["rejected"] for item in items]),
    }
