"""Toy-world datasets shared by the training scripts, the benchmarks and the demo."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import defects, scenes

MODELS_DIR = Path(__file__).resolve().parent / "models"
TOY_CLIP_CHECKPOINT = MODELS_DIR / "toy-clip.safetensors"
TOY_PROMPTS = MODELS_DIR / "toy-quality-prompts.safetensors"
TOY_SD_FOLDER = MODELS_DIR / "tiny-sd"
PERCEPTUAL_KINDS = ("blur_patch", "noise_patch", "broken_shape", "colour_cast")
ALIGNMENT_KINDS = ("missing_object", "wrong_colour", "wrong_count")
FACTOR_ORDER = ("overall", "technical", "rational", "natural")  # = core.pq_map.QUALITY_FACTORS
TRAIN_SEED_OFFSET = 0
TEST_SEED_OFFSET = 2 * 10**9


@dataclass
class PerceptualSet:
    """Pictures with perceptual defects. images: (N, H, W, 3) float in [0, 1]; masks: (N, H, W) bool, any perceptual
    defect; factor_masks: (N, 3, H, W) bool per defect factor (technical, rational, natural); labels: (N, 4) binary
    quality per factor in FACTOR_ORDER (1 = no defect of that factor; overall = no perceptual defect);
    area_quality: (N,) 1 - defective area fraction (the graded label); kinds: N lists of defect kinds."""

    images: torch.Tensor
    masks: torch.Tensor
    factor_masks: torch.Tensor
    labels: torch.Tensor
    area_quality: torch.Tensor
    kinds: list[list[str]]


def perceptual_set(count: int, seed_offset: int, resolution: int = 64, max_defects: int = 2) -> PerceptualSet:
    """``count`` examples (seeds ``seed_offset + i``), each with 0..max_defects perceptual defects."""
    images, masks, factor_masks, labels, area, kinds = [], [], [], [], [], []
    for index in range(count):
        image, _, by_kind, quality = defects.make_example(
            seed_offset + index, resolution, kinds=PERCEPTUAL_KINDS, max_defects=max_defects
        )
        per_factor = np.zeros((3, resolution, resolution), bool)
        for kind, mask in by_kind.items():
            per_factor[defects.PERCEPTUAL_FACTORS.index(defects.KIND_FACTOR[kind])] |= mask
        images.append(image)
        factor_masks.append(per_factor)
        masks.append(per_factor.any(axis=0))
        labels.append([float(not per_factor.any())] + [float(not per_factor[f].any()) for f in range(3)])
        area.append(quality["overall"])
        kinds.append(sorted(by_kind))
    return PerceptualSet(
        images=torch.from_numpy(np.stack(images)).float() / 255.0,
        masks=torch.from_numpy(np.stack(masks)),
        factor_masks=torch.from_numpy(np.stack(factor_masks)),
        labels=torch.tensor(labels),
        area_quality=torch.tensor(area),
        kinds=kinds,
    )


@dataclass
class AlignmentCase:
    """One alignment test picture: image (H, W, 3) float in [0, 1]; caption of the scene as asked; kind (None for a
    correct picture); target_noun of the affected group; mask (H, W) bool of the affected region."""

    image: torch.Tensor
    caption: str
    kind: str | None
    target_noun: str | None
    mask: np.ndarray | None


def alignment_cases(count: int, seed_offset: int, resolution: int = 64) -> list[AlignmentCase]:
    """``count`` pictures cycling through: correct, missing object, wrong colour, wrong count."""
    cases = []
    cycle = (None,) + ALIGNMENT_KINDS
    for index in range(count):
        kind = cycle[index % len(cycle)]
        rng = np.random.default_rng(seed_offset + index)
        scene = scenes.sample_scene(rng, resolution)
        while kind is not None and not defects.applicable(kind, scene):
            scene = scenes.sample_scene(rng, resolution)
        image, caption = scenes.render(scene), scenes.caption(scene)
        if kind is None:
            cases.append(AlignmentCase(torch.from_numpy(image).float() / 255.0, caption, None, None, None))
            continue
        defect = defects.INJECTORS[kind](image, scene, rng)
        cases.append(AlignmentCase(torch.from_numpy(defect.image).float() / 255.0, caption, kind,
                                   defect.target_noun, defect.mask))
    return cases
