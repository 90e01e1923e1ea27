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

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .config import DATASET_FILE

MAX_LISTED_PROBLEMS = 25


@dataclass(frozen=True)
class PreferencePair:
    """One pair. line: 1-based line number in the file (for messages)."""

    prompt: str
    preferred: Path
    rejected: Path
    line: int


class DatasetError(ValueError):
    """A dataset that cannot be trained on; ``problems`` lists every finding as "line N: ..."."""

    def __init__(self, path: Path, problems: list[str]):
        self.path = path
        self.problems = problems
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(
            f"The preference dataset '{path}' has {len(problems)} problem(s); nothing was trained or written. "
            f"Fix these lines and run again:\n  " + "\n  ".join(shown) + more
        )


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


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """An image file as a (3, H, W) float tensor in [0, 1] at the tower's input ``size`` = (H, W): converted to
    RGB, shorter side resized to fit (bicubic), then centre-cropped, as open_clip's own preprocessing does."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read the image '{path}': {error}") from error
    height, width = size
    if image.size != (width, height):
        scale = max(height / image.height, width / image.width)
        resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(resized, Image.Resampling.BICUBIC)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
    return pixels.permute(2, 0, 1).float() / 255.0  # HWC -> CHW


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


class StepBatchSampler(Sampler):
    """Micro-batches of pair indices, micro-batch ``i`` being a fixed function of (seed, i).

    Epoch ``e`` is a permutation of all pairs drawn from ``seed`` and ``e``; it is cut into global batches of
    ``batch_size * num_processes`` (the remainder is dropped), and each process takes its slice. Iteration yields
    micro-batches ``start, start + 1, ..., stop - 1``, so resuming at micro-batch ``start`` continues the same order.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stop: int,
                 num_processes: int = 1, process_index: int = 0):
        self.global_batch = batch_size * num_processes
        if num_items < self.global_batch:
            raise ValueError(
                f"The dataset has {num_items} pairs, fewer than one batch ({batch_size} per device x "
                f"{num_processes} processes): lower --train-batch-size or add pairs."
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start, self.stop = start, stop
        self.process_index = process_index
        self.per_epoch = num_items // self.global_batch
        self._epoch, self._order = -1, None

    def batch(self, index: int) -> list[int]:
        epoch, within = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            self._epoch, self._order = epoch, torch.randperm(self.num_items, generator=generator)
        begin = within * self.global_batch + self.process_index * self.batch_size
        return self._order[begin : begin + self.batch_size].tolist()

    def __iter__(self):
        for index in range(self.start, self.stop):
            yield self.batch(index)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)
