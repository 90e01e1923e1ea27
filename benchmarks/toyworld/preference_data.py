"""Toy-world preference pairs for reward training (Stable Preference benchmark).

A pair is one scene (``scenes.sample_scene``) rendered twice with a *nested* chain of defects (``defects.INJECTORS``,
alignment defects first as in ``defects.make_example``): the preferred picture carries the first ``n`` defects of
the chain (n = 0 or 1), the rejected one the first ``n + 1`` to ``n + 2``, so it has every defect of the preferred
picture and at least one more. The prompt is the scene's caption. Deterministic from the seed.

Splits written by :func:`build_splits` (PNG pictures + ``pairs.jsonl`` in the trainer's format):
- ``train/``: ``{"prompt", "preferred", "rejected"}``, with a seeded ``flip_fraction`` (default 20 %) of the pairs'
  labels swapped (``"flipped": true`` on those lines, for analysis only; the trainer ignores it);
- ``test/``: clean labels, in the ``{"prompt", "image_0", "image_1", "label"}`` format with a random order, so both
  formats are exercised.
Each line also records ``preferred_defects`` / ``rejected_defects`` (kinds, for analysis).

Run: python -m comfyui_refinery.benchmarks.toyworld.preference_data --output /tmp/toy-preference
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from . import data, defects, scenes

TRAIN_SEED_OFFSET = data.TRAIN_SEED_OFFSET + 7 * 10**6
TEST_SEED_OFFSET = data.TEST_SEED_OFFSET + 7 * 10**6
FLIP_SEED_STREAM = 991


def make_pair(seed: int, resolution: int = 64) -> tuple[np.ndarray, np.ndarray, str, list[str], list[str]]:
    """(preferred (H, W, 3) uint8, rejected (H, W, 3) uint8, caption, preferred defect kinds, rejected defect kinds)
    for scene ``seed``; the rejected picture has the preferred one's defects and 1-2 more."""
    rng = np.random.default_rng(seed)
    scene = scenes.sample_scene(rng, resolution)
    image, caption = scenes.render(scene), scenes.caption(scene)
    fewer = int(rng.integers(0, 2))
    more = fewer + int(rng.integers(1, 3))
    chain: list[str] = []
    for kind in rng.permutation([k for k in defects.KINDS if defects.applicable(k, scene)]):
        if defects.KIND_FACTOR[kind] == "alignment" and any(defects.KIND_FACTOR[c] == "alignment" for c in chain):
            continue
        chain.append(str(kind))
    chain.sort(key=lambda kind: defects.KIND_FACTOR[kind] != "alignment")
    pictures, applied, shown = [image], [], scene
    for kind in chain:
        if len(applied) == more:
            break
        if not defects.applicable(kind, shown):
            continue
        defect = defects.INJECTORS[kind](pictures[-1], shown, rng)
        pictures.append(defect.image)
        applied.append(kind)
        shown = defect.shown
    fewer = min(fewer, len(applied) - 1)  # at least one defect more in the rejected picture
    return pictures[fewer], pictures[len(applied)], caption, applied[:fewer], applied


def _save_png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    temporary = path.with_name(path.name + ".tmp.png")
    Image.fromarray(pixels, "RGB").save(temporary)
    os.replace(temporary, path)


def build_split(folder: str | os.PathLike, count: int, seed_offset: int, flip_fraction: float = 0.0,
                seed: int = 0, label_format: bool = False, resolution: int = 64) -> Path:
    """Write ``count`` pairs (scene seeds ``seed_offset + i``) as PNGs and ``pairs.jsonl`` into ``folder``; swap
    the labels of ``round(flip_fraction * count)`` pairs chosen with ``seed``; ``label_format`` writes
    ``image_0/image_1/label`` lines with a seeded random order. Returns the ``pairs.jsonl`` path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, FLIP_SEED_STREAM])
    flipped = set(rng.permutation(count)[: int(round(flip_fraction * count))].tolist())
    order = rng.integers(0, 2, size=count)
    lines = []
    for index in range(count):
        preferred, rejected, caption, preferred_kinds, rejected_kinds = make_pair(seed_offset + index, resolution)
        names = (f"images/{index:05d}_a.png", f"images/{index:05d}_b.png")
        _save_png(preferred, folder / names[0])
        _save_png(rejected, folder / names[1])
        record = {"prompt": caption}
        winner, loser = names if index not in flipped else names[::-1]
        if label_format:
            first_is_winner = bool(order[index] == 0)
            record.update(image_0=winner if first_is_winner else loser, image_1=loser if first_is_winner else winner,
                          label=0 if first_is_winner else 1)
        else:
            record.update(preferred=winner, rejected=loser)
        record.update(flipped=index in flipped, preferred_defects=preferred_kinds, rejected_defects=rejected_kinds)
        lines.append(json.dumps(record))
    path = folder / "pairs.jsonl"
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


def build_splits(root: str | os.PathLike, train_pairs: int = 1500, test_pairs: int = 500,
                 flip_fraction: float = 0.2, seed: int = 0, resolution: int = 64) -> tuple[Path, Path]:
    """``root/train`` (noisy labels) and ``root/test`` (clean labels). Returns the two folders."""
    root = Path(root)
    build_split(root / "train", train_pairs, TRAIN_SEED_OFFSET, flip_fraction, seed, False, resolution)
    build_split(root / "test", test_pairs, TEST_SEED_OFFSET, 0.0, seed, True, resolution)
    return root / "train", root / "test"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the toy-world preference dataset (train with flipped labels, "
                                     "clean test).")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--train-pairs", type=int, default=1500)
    parser.add_argument("--test-pairs", type=int, default=500)
    parser.add_argument("--flip-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, test = build_splits(args.output, args.train_pairs, args.test_pairs, args.flip_fraction, args.seed)
    print(f"wrote {train} and {test}")


if __name__ == "__main__":
    main()
