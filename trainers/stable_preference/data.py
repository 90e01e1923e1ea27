"""Preference pairs from a local ``pairs.jsonl``: strict reading with line-numbered errors, image loading, and
batches that are a fixed function of (seed, micro-batch index) so a resumed run sees exactly the same data.

Line formats (one JSON object per line; blank lines are skipped; other keys are kept out of the way and ignored):
- ``{"prompt": str, "preferred": path, "rejected": path}``;
- ``{"prompt": str, "image_0": path, "image_1": path, "label": 0 | 1}``, ``label`` = index of the preferred image
  (ties, label 0.5, are refused: the pairwise losses need a winner).
Paths are relative to the folder of the ``.jsonl`` file (absolute paths are used as they are).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..common.data import DatasetError, StepBatchSampler, load_image
from .config import DATASET_FILE

__all__ = ["DatasetError", "PreferencePair", "PreferenceDataset", "StepBatchSampler", "collate", "dataset_file",
           "load_image", "read_pairs"]


@dataclass(frozen=True)
class PreferencePair:
    """One pair. line: 1-based line number in the file (for messages)."""

    prompt: str
    preferred: Path
    rejected: Path
    line: int


def dataset_file(path: str | Path) -> Path:
    """``path`` itself if it is a file, else ``path/pairs.jsonl``."""
    path = Path(path)
    return path if path.is_file() else path / DATASET_FILE


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
    paths = {}
    for key in image_keys:
        value = obj[key]
        if not isinstance(value, str) or not value:
            problems.append(f"{where}: '{key}' must be a file path string, got {value!r}")
            continue
        path = Path(value) if Path(value).is_absolute() else root / value
        if not path.is_file():
            problems.append(f"{where}: '{key}' image '{value}' not found (looked for '{path}')")
        paths[key] = path
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
    file = dataset_file(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(file, [f"cannot read the file: {error}"]) from error
    pairs, problems = [], []
    root = file.parent
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"line {number}: malformed JSON ({error.msg} at column {error.colno})")
            continue
        pair, found = _parse_line(obj, number, root)
        problems += found
        if pair is not None:
            pairs.append(pair)
    if not pairs and not problems:
        problems.append("no preference pairs in the file")
    if problems:
        raise DatasetError(file, problems)
    return pairs


class PreferenceDataset(Dataset):
    """Items ``{"prompt": str, "preferred": (3, H, W), "rejected": (3, H, W)}``, pixels in [0, 1]."""

    def __init__(self, pairs: list[PreferencePair], image_size: tuple[int, int]):
        self.pairs = pairs
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        try:
            preferred = load_image(pair.preferred, self.image_size)
            rejected = load_image(pair.rejected, self.image_size)
        except ValueError as error:
            raise ValueError(f"Dataset line {pair.line}: {error}") from error
        return {"prompt": pair.prompt, "preferred": preferred, "rejected": rejected}


def collate(items: list[dict]) -> dict:
    """-> ``{"prompts": [B str], "preferred": (B, 3, H, W), "rejected": (B, 3, H, W)}``."""
    return {
        "prompts": [item["prompt"] for item in items],
        "preferred": torch.stack([item["preferred"] for item in items]),
        "rejected": torch.stack([item["rejected"] for item in items]),
    }
