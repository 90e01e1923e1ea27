"""Dataset pieces every trainer shares: line-numbered dataset errors, image loading at a fixed size, and batches that
are a fixed function of (seed, micro-batch index), so a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

MAX_LISTED_PROBLEMS = 25


class DatasetError(ValueError):
    """A dataset that cannot be trained on; ``problems`` lists every finding as "line N: ..."."""

    def __init__(self, path: Path, problems: list[str], what: str = "preference dataset"):
        self.path = path
        self.problems = problems
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(
            f"The {what} '{path}' has {len(problems)} problem(s); nothing was trained or written. "
            f"Fix these lines and run again:\n  " + "\n  ".join(shown) + more
        )


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
