"""Syn-Pic ranked groups from a local ``index.jsonl`` (written by ``refinery-synpic``): strict reading with
line-numbered errors, and image loading at the training resolution.

Line format (one JSON object per line; blank lines skipped; other keys such as ``scores``, ``generators`` ignored)::

    {"prompt": str, "images": [path, path, ...], "win_rates": [phi_1, phi_2, ...]}

k >= 2 images per prompt, one win rate in [0, 1] per image (higher = preferred). Paths are relative to the folder of
the ``.jsonl`` file (absolute paths are used as they are). A group whose win rates are all equal has no preferred
pair: it is skipped with a warning (it would only cost compute).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common.data import (INDEX_FILE, DatasetError, LineItemDataset, dataset_file, line_image, load_image,
                           read_json_lines)

logger = logging.getLogger(__name__)
WHAT = "Syn-Pic dataset"


@dataclass(frozen=True)
class RankedGroup:
    """The k ranked images of one prompt. line: 1-based line number in the file (for messages)."""

    prompt: str
    images: tuple[Path, ...]
    win_rates: tuple[float, ...]
    line: int

    def best_and_worst(self) -> RankedGroup:
        """The pair pairwise DPO trains on: the highest and the lowest win rate (first of equals)."""
        best = max(range(len(self.win_rates)), key=lambda index: (self.win_rates[index], -index))
        worst = min(range(len(self.win_rates)), key=lambda index: (self.win_rates[index], index))
        return RankedGroup(self.prompt, (self.images[best], self.images[worst]),
                           (self.win_rates[best], self.win_rates[worst]), self.line)


def _parse_line(obj, number: int, root: Path) -> tuple[RankedGroup | None, list[str]]:
    where = f"line {number}"
    if not isinstance(obj, dict):
        return None, [f"{where}: expected a JSON object, got {type(obj).__name__}"]
    missing = [key for key in ("prompt", "images", "win_rates") if key not in obj]
    if missing:
        return None, [f"{where}: missing key(s) {missing}; each line needs prompt, images and win_rates"]
    problems = []
    prompt, images, win_rates = obj["prompt"], obj["images"], obj["win_rates"]
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    if not isinstance(images, list) or len(images) < 2:
        count = len(images) if isinstance(images, list) else type(images).__name__
        problems.append(f"{where}: 'images' must list at least 2 image paths per prompt (a ranking needs two), got "
                        f"{count}")
        return None, problems
    paths = [line_image(value, root, f"images[{position}]", where, problems) for position, value in enumerate(images)]
    if not isinstance(win_rates, list) or len(win_rates) != len(images):
        count = len(win_rates) if isinstance(win_rates, list) else type(win_rates).__name__
        problems.append(f"{where}: 'win_rates' must hold one number per image ({len(images)}), got {count}")
    else:
        for position, value in enumerate(win_rates):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 <= value <= 1:
                problems.append(f"{where}: win_rates[{position}] must be a number in [0, 1], got {value!r}")
    if problems:
        return None, problems
    if len({path.resolve() for path in paths}) != len(paths):
        return None, [f"{where}: the same image file is listed twice"]
    return RankedGroup(prompt, tuple(paths), tuple(float(value) for value in win_rates), number), []


def read_groups(path: str | Path) -> list[RankedGroup]:
    """Read and check every line of the dataset at ``path`` (folder or .jsonl). Raises DatasetError listing every
    problem with its line number (malformed JSON, missing keys, fewer than 2 images, bad win rates, missing files);
    groups without a preferred pair (all win rates equal) are dropped with a warning."""
    file = dataset_file(path, INDEX_FILE)
    found, problems = read_json_lines(file, lambda obj, number: _parse_line(obj, number, file.parent), WHAT)
    groups = [group for group in found if len(set(group.win_rates)) > 1]
    tied = [group for group in found if len(set(group.win_rates)) == 1]
    if problems:
        raise DatasetError(file, problems, WHAT)
    if tied:
        logger.warning("Skipping %d prompt(s) whose images all have the same win rate (no preferred pair), e.g. "
                       "line %d.", len(tied), tied[0].line)
    if not groups:
        raise DatasetError(file, ["no prompt with a preferred image (at least two different win rates)"], WHAT)
    return groups


class RankedGroupDataset(LineItemDataset):
    """Items ``{"prompt": str, "pixels": (k, 3, H, W) in [-1, 1], "win_rates": (k,) float32}`` of ranked groups,
    images resized and centre-cropped to ``resolution``."""

    def __init__(self, groups: list[RankedGroup], resolution: int):
        super().__init__(groups)
        self.resolution = resolution

    def load(self, group: RankedGroup) -> dict:
        size = (self.resolution, self.resolution)
        pixels = torch.stack([load_image(path, size) for path in group.images])
        return {"prompt": group.prompt, "pixels": pixels * 2.0 - 1.0,
                "win_rates": torch.tensor(group.win_rates, dtype=torch.float32)}


def collate(items: list[dict]) -> dict:
    """Groups of any sizes -> ``{"prompts": [P], "pixels": (sum k, 3, H, W), "group_sizes": [P ints],
    "win_rates": [P tensors (k_p,)]}`` (images of group p are rows ``sum(k_<p) ... + k_p``)."""
    return {
        "prompts": [item["prompt"] for item in items],
        "pixels": torch.cat([item["pixels"] for item in items]),
        "group_sizes": [item["pixels"].shape[0] for item in items],
        "win_rates": [item["win_rates"] for item in items],
    }
