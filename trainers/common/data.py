"""Dataset pieces every trainer shares: dataset files and their line-numbered errors (JSON lines, prompt lists),
image loading at a fixed size, and batches that are a fixed function of (seed, micro-batch index), so a resumed run
sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

MAX_LISTED_PROBLEMS = 25
INDEX_FILE = "index.jsonl"  # a Syn-Pic ranked dataset: refinery-synpic writes it, refinery-train-rankdpo reads it


PROMPTS_FILE = "--prompts file"  # the DatasetError name of a prompt list


class DatasetError(ValueError):
    """A dataset (or prompts file) that cannot be used; ``problems`` lists every finding as "line N: ..."."""

    def __init__(self, path: Path, problems: list[str], what: str = "preference dataset"):
        self.path = path
        self.problems = problems
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(
            f"The {what} '{path}' has {len(problems)} problem(s); nothing was run or written. "
            f"Fix these lines and run again:\n  " + "\n  ".join(shown) + more
        )


def dataset_file(path: str | Path, file_name: str) -> Path:
    """``path`` itself if it is a file, else ``path/file_name`` (a dataset given as its folder)."""
    path = Path(path)
    return path if path.is_file() else path / file_name


def read_json_lines(file: Path, parse_line: Callable[[Any, int], tuple[Any, list[str]]],
                    what: str) -> tuple[list, list[str]]:
    """Decode every non-blank line of the JSON-lines ``file`` and hand it to ``parse_line(object, line number)``,
    which returns ``(item or None, problems)``. Returns ``(items, problems)``, problems as "line N: ..." (malformed
    JSON included); DatasetError (naming the dataset as ``what``) when the file cannot be read."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(file, [f"cannot read the file: {error}"], what) from error
    items, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"line {number}: malformed JSON ({error.msg} at column {error.colno})")
            continue
        item, found = parse_line(obj, number)
        problems += found
        if item is not None:
            items.append(item)
    return items, problems


def line_image(value: Any, root: Path, name: str, where: str, problems: list[str]) -> Path | None:
    """The image file a dataset line names: ``value``, a path string relative to the dataset file's folder ``root``
    (absolute paths as they are). A value that is not a path string, or names no file, adds "<where>: <name> ..." to
    ``problems``. Returns the path (None when ``value`` is not a path string)."""
    if not isinstance(value, str) or not value:
        problems.append(f"{where}: {name} must be a file path string, got {value!r}")
        return None
    path = Path(value) if Path(value).is_absolute() else root / value
    if not path.is_file():
        problems.append(f"{where}: {name} '{value}' not found (looked for '{path}')")
    return path


def read_prompts(path: Path) -> list[str]:
    """Prompts of a .txt (one per line; blank and '#' lines skipped) or .jsonl ({"prompt": str} per line) file.
    DatasetError listing bad lines with their numbers, or for a file without prompts."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        def parse_line(obj, number: int) -> tuple[str | None, list[str]]:
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                return None, [f"line {number}: needs a non-empty string 'prompt'"]
            return prompt.strip(), []

        prompts, problems = read_json_lines(path, parse_line, PROMPTS_FILE)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError(path, [f"cannot read the file: {error}"], PROMPTS_FILE) from error
        lines = (line.strip() for line in text.splitlines())
        prompts, problems = [line for line in lines if line and not line.startswith("#")], []
    if not prompts and not problems:
        problems.append("it holds no prompt")
    if problems:
        raise DatasetError(path, problems, PROMPTS_FILE)
    return prompts


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


class LineItemDataset(Dataset):
    """The items read from a dataset file (each with its 1-based ``line``), loaded by :meth:`load` when accessed; a
    ValueError while loading (an unreadable image) names the item's line."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        try:
            return self.load(item)
        except ValueError as error:
            raise ValueError(f"Dataset line {item.line}: {error}") from error

    def load(self, item) -> dict:
        raise NotImplementedError


def save_png(picture: torch.Tensor, path: Path) -> Path:
    """Write ``picture`` (H, W, 3) float in [0, 1] as an 8-bit PNG, atomically (never a half-written file under
    ``path``). Returns the path."""
    import io

    from PIL import Image

    from .atomic import atomic_write_bytes

    array = (picture.detach().cpu().float().numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


class StepBatchSampler(Sampler):
    """Micro-batches of item indices, micro-batch ``i`` being a fixed function of (seed, i).

    Epoch ``e`` is a permutation of all items drawn from ``seed`` and ``e``; it is cut into global batches of
    ``batch_size * num_processes`` (the remainder is dropped), and each process takes its slice. Iteration yields
    micro-batches ``start, start + 1, ..., stop - 1``, so resuming at micro-batch ``start`` continues the same order.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stop: int,
                 num_processes: int = 1, process_index: int = 0, item_name: str = "pairs"):
        self.global_batch = batch_size * num_processes
        if num_items < self.global_batch:
            raise ValueError(
                f"The dataset has {num_items} {item_name}, fewer than one batch ({batch_size} per device x "
                f"{num_processes} processes): lower --train-batch-size or add {item_name}."
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
