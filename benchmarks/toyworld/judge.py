"""The toy world's attribute judge: what a picture shows against what its caption asks, from the scene renderer's
own palette and shape templates (a GenEval-like judge, not a learned model).

For any caption of the toy grammar (``scenes.caption``: one or two object groups, counts 1-3, two sizes, six
colours, four shapes, a relation, any background) the judge finds the objects in the picture and checks, for each
group, its colour, shape, size and count, and for two groups their relation:

1. every pixel takes the nearest of the six palette colours and the four background tones (L1 distance in RGB);
   pixels nearest a palette colour, within ``COLOUR_TOLERANCE``, are object pixels of that colour;
2. object pixels of one colour split into 8-connected components; components under ``MIN_AREA`` pixels are noise;
3. a component's shape is the template (``scenes.shape_mask``) with the best IoU at the component's centroid, the
   template's radius fitted to the component's area; its size is the nearer of "small" and "large" to that radius;
4. a group's components are those of its colour (when two groups share a colour, each component goes to the group
   whose shape fits it better); count right = that many components; shape and size right = most of them have it.

The judge must be right before it judges anything: on clean rendered scenes it is checked (tests, and the
``judge_on_renders`` key of ``benchmarks/toyworld_models.py``) to find every attribute of every group.

Conventions: pictures are ``(H, W, 3) uint8`` (or float in [0, 1] for :class:`AttributeJudge`), square, any side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from . import scenes

COLOUR_TOLERANCE = 150
"""Largest L1 RGB distance (0-765) from a palette colour for a pixel to count as that colour."""
MIN_AREA_FRACTION = 0.0015
"""Components smaller than this fraction of the picture (6 px at 64 px) are noise, not objects."""
PALETTE = np.array(list(scenes.COLOURS.values()), np.int32)  # (6, 3)
BACKGROUND_TONES = np.array([tone for pair in scenes.BACKGROUND_COLOURS.values() for tone in pair], np.int32)  # (4, 3)
# Area of a shape of bounding radius 1 (from the renderer's own templates at a large radius).
_SHAPE_AREA = {}

_GROUP = r"(a|an|two|three) (small|large) (\w+) (\w+)"
_CAPTION = re.compile(rf"^{_GROUP}(?: (left of|above|below) {_GROUP})? on an? (.+) background$")
_WORD_COUNTS = {"a": 1, "an": 1, "two": 2, "three": 3}


@dataclass(frozen=True)
class GroupSpec:
    """One object group as a caption asks for it."""

    count: int
    size: str
    colour: str
    shape: str


@dataclass(frozen=True)
class CaptionSpec:
    """A parsed toy caption: groups in caption order, the relation of the first to the second (or None), and the
    background phrase ("plain grey", "striped")."""

    groups: tuple[GroupSpec, ...]
    relation: str | None
    background: str


@dataclass(frozen=True)
class Component:
    """One object found in a picture: its colour, pixel count, centroid (x, y), best-fitting shape and size."""

    colour: str
    area: int
    centre: tuple[float, float]
    shape: str
    size: str


@dataclass(frozen=True)
class GroupVerdict:
    """What the picture shows of one caption group."""

    colour_right: bool
    shape_right: bool
    size_right: bool
    count_right: bool
    found: int

    @property
    def all_right(self) -> bool:
        return self.colour_right and self.shape_right and self.size_right and self.count_right


@dataclass(frozen=True)
class Verdict:
    """The judge's findings for one picture. relation_right is None for one group."""

    groups: tuple[GroupVerdict, ...]
    relation_right: bool | None
    components: tuple[Component, ...]

    @property
    def all_right(self) -> bool:
        return all(group.all_right for group in self.groups) and self.relation_right is not False

    @property
    def score(self) -> float:
        """Fraction of the checks that pass, in [0, 1]: four per group (colour, shape, size, count), plus the
        relation for two groups."""
        checks = [value for group in self.groups
                  for value in (group.colour_right, group.shape_right, group.size_right, group.count_right)]
        if self.relation_right is not None:
            checks.append(self.relation_right)
        return float(np.mean(checks))


def parse_caption(caption: str) -> CaptionSpec:
    """The groups, relation and background of a toy caption; ValueError for text outside the toy grammar."""
    found = _CAPTION.match(caption.strip())
    if not found:
        raise ValueError(f"Not a toy-world caption: {caption!r} (expected e.g. 'two large red circles left of a "
                         "small blue square on a striped background').")
    parts = found.groups()
    groups = []
    for count_word, size, colour, noun in (parts[0:4], parts[5:9]):
        if count_word is None:
            continue
        shape = noun[:-1] if noun.endswith("s") and noun[:-1] in scenes.SHAPES else noun
        if colour not in scenes.COLOURS or shape not in scenes.SHAPES:
            raise ValueError(f"Unknown colour or shape in {caption!r}: {colour!r}, {noun!r}.")
        groups.append(GroupSpec(_WORD_COUNTS[count_word], size, colour, shape))
    return CaptionSpec(tuple(groups), parts[4], parts[9])


def _unit_area(shape: str) -> float:
    if shape not in _SHAPE_AREA:
        radius, resolution = 200.0, 512
        _SHAPE_AREA[shape] = float(scenes.shape_mask(shape, (255.5, 255.5), radius, resolution).sum()) / radius**2
    return _SHAPE_AREA[shape]


def colour_labels(picture: np.ndarray) -> np.ndarray:
    """(H, W) int: index into ``scenes.COLOURS`` of each object pixel, -1 for background or unclear pixels."""
    pixels = picture.astype(np.int32).reshape(-1, 1, 3)
    palette_distance = np.abs(pixels - PALETTE[None]).sum(axis=-1)  # (HW, 6)
    background_distance = np.abs(pixels - BACKGROUND_TONES[None]).sum(axis=-1).min(axis=1)  # (HW,)
    nearest = palette_distance.argmin(axis=1)
    best = palette_distance.min(axis=1)
    labels = np.where((best < background_distance) & (best <= COLOUR_TOLERANCE), nearest, -1)
    return labels.reshape(picture.shape[:2])


def classify_component(mask: np.ndarray) -> tuple[str, str, tuple[float, float]]:
    """(shape, size, centroid (x, y)) of one component ``mask`` (H, W) bool: the template of best IoU at the
    centroid with its radius fitted to the area; size is the nearer of the two radii (``scenes.SIZES``)."""
    resolution = mask.shape[0]
    ys, xs = np.nonzero(mask)
    centre = (float(xs.mean()), float(ys.mean()))
    area = float(mask.sum())
    best_iou, best_shape, best_radius = -1.0, scenes.SHAPES[0], 1.0
    for shape in scenes.SHAPES:
        radius = float(np.sqrt(area / _unit_area(shape)))
        template = scenes.shape_mask(shape, centre, radius, resolution)
        iou = float((template & mask).sum()) / max(1.0, float((template | mask).sum()))
        if iou > best_iou:
            best_iou, best_shape, best_radius = iou, shape, radius
    small, large = (fraction * resolution for fraction in scenes.SIZES.values())
    size = "small" if abs(best_radius - small) <= abs(best_radius - large) else "large"
    return best_shape, size, centre


def find_components(picture: np.ndarray) -> list[Component]:
    """Every object in ``picture`` (H, W, 3) uint8: palette-coloured 8-connected components of at least
    ``MIN_AREA_FRACTION`` of the picture, largest first."""
    labels = colour_labels(picture)
    minimum = max(3, int(round(MIN_AREA_FRACTION * labels.size)))
    components = []
    names = list(scenes.COLOURS)
    for index, colour in enumerate(names):
        pieces, count = ndimage.label(labels == index, structure=np.ones((3, 3)))
        for piece in range(1, count + 1):
            mask = pieces == piece
            area = int(mask.sum())
            if area >= minimum:
                shape, size, centre = classify_component(mask)
                components.append(Component(colour, area, centre, shape, size))
    return sorted(components, key=lambda component: -component.area)


def _majority(values: list[bool]) -> bool:
    return bool(values) and sum(values) * 2 >= len(values)


def judge(picture: np.ndarray, caption: str | CaptionSpec) -> Verdict:
    """The verdict on ``picture`` (H, W, 3) uint8 for ``caption`` (text or parsed)."""
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    components = find_components(picture)
    assigned: list[list[Component]] = [[] for _ in spec.groups]
    for component in components:
        owners = [g for g, group in enumerate(spec.groups) if group.colour == component.colour]
        if len(owners) > 1:  # two groups of one colour: the group whose shape the component has, else the first
            owners = [g for g in owners if spec.groups[g].shape == component.shape] or owners
        if owners:
            assigned[owners[0]].append(component)
    verdicts = []
    for group, found in zip(spec.groups, assigned):
        verdicts.append(GroupVerdict(
            colour_right=bool(found),
            shape_right=_majority([c.shape == group.shape for c in found]),
            size_right=_majority([c.size == group.size for c in found]),
            count_right=len(found) == group.count,
            found=len(found),
        ))
    relation_right = None
    if spec.relation is not None:
        relation_right = False
        if assigned[0] and assigned[1]:
            first = np.mean([c.centre for c in assigned[0]], axis=0)
            second = np.mean([c.centre for c in assigned[1]], axis=0)
            relation_right = bool({"left of": first[0] < second[0], "above": first[1] < second[1],
                                   "below": first[1] > second[1]}[spec.relation])
    return Verdict(tuple(verdicts), relation_right, tuple(components))


def main_object(picture: np.ndarray) -> Component | None:
    """The largest object in ``picture`` (H, W, 3) uint8, or None: what a single-object caption is judged on."""
    components = find_components(picture)
    return components[0] if components else None


class AttributeJudge(torch.nn.Module):
    """:func:`judge` as a reward with the interface of ``core/rewards``: ``score(images (B, H, W, 3) float in
    [0, 1], prompts) -> (B,)`` the fraction of checks that pass (:attr:`Verdict.score`), in [0, 1]. Any toy
    caption; not differentiable; used as the reward *not* used in training."""

    uses_prompts = True

    def __init__(self):
        super().__init__()
        self.name = "attribute-judge"

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts, differentiable: bool = False) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3), got {tuple(images.shape)}.")
        prompts = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images.")
        pictures = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return torch.tensor([judge(np.ascontiguousarray(picture), caption).score
                             for picture, caption in zip(pictures, prompts)], dtype=torch.float32)
