"""Toy-world scene generator: a few flat shapes on a plain or textured background, with a caption.

Everything is numpy, deterministic from a ``np.random.Generator`` (or an integer seed in :func:`generate`), and
exact: no antialiasing, so :func:`object_masks` gives each object group's pixels exactly and every pixel inside a
group's mask has that group's RGB colour (objects never overlap and never touch: a gap of at least 2 px).

Conventions
- Images are ``(H, W, 3) uint8`` with ``H == W == resolution``; masks are ``(H, W) bool``.
- Pixel ``(row i, column j)`` has coordinates ``x = j``, ``y = i`` (y grows downwards); centres are floats.
- A scene has one or two *object groups* (same shape, colour and size, ``count`` items each); two groups always
  have different shapes, so every noun of the caption names one group.
- Two groups are placed in opposite halves of the picture, so the relation in the caption is true for every item:
  "left of" (the first-named group is the left one; "right of" is never written because the offline tagger of
  ``core/prompt_parsing.py`` tags "right" as a noun), "above" or "below".

Caption grammar (one phrase per group plus the background under ``parse_prompt``)::

    <count> <size> <colour> <shape>[s] [<relation> <count> <size> <colour> <shape>[s]] on a <background>
    background := "plain <colour> background" | "striped background" | "checkered background" | "dotted background"

e.g. "two large red circles left of a small blue square on a striped background".
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# ------------------------------------------------------------------------------------------------ vocabulary
SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {  # well separated in RGB, none equal to a background tone
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "purple": (140, 40, 190),
}
SIZES: dict[str, float] = {"small": 0.08, "large": 0.13}  # bounding radius as a fraction of the resolution
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
BACKGROUNDS = ("plain", "striped", "checkered", "dotted")
# Background colour name -> (base tone, second tone of the texture). Plain backgrounds use the base tone only.
BACKGROUND_COLOURS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "grey": ((128, 128, 128), (88, 88, 88)),
    "black": ((15, 15, 15), (60, 60, 60)),
}
RELATIONS = ("left of", "above", "below")
GAP = 2.0  # minimum free distance (px) between the bounding discs of two items


@dataclass(frozen=True)
class SceneObject:
    """One object group: ``count`` items of the same shape, colour and size.

    centres: ``count`` (x, y) float pairs in pixels; radius: bounding radius in pixels (every pixel of an item lies
    within ``radius`` of its centre)."""

    shape: str
    colour: str
    size: str
    count: int
    centres: tuple[tuple[float, float], ...]
    radius: float

    @property
    def noun(self) -> str:
        """The noun as written in the caption ("circle" or "circles")."""
        return self.shape + ("s" if self.count > 1 else "")

    @property
    def phrase(self) -> str:
        """"two large red circles"."""
        return f"{COUNT_WORDS[self.count]} {self.size} {self.colour} {self.noun}"


@dataclass(frozen=True)
class Scene:
    """A full scene. objects: 1-2 groups in caption order; relation: of ``objects[0]`` to ``objects[1]`` (one of
    :data:`RELATIONS`, None for one group); texture_period: stripe / check / dot period in px."""

    objects: tuple[SceneObject, ...]
    background: str
    background_colour: str
    resolution: int
    relation: str | None = None
    texture_period: int = 8


# ------------------------------------------------------------------------------------------------ sampling
def _place_group(rng, count, radius, box, placed, tries=60):
    """Sample ``count`` centres in ``box = (x0, x1, y0, y1)`` (inclusive bounds for the item's bounding disc)
    whose discs keep ``GAP`` from each other and from ``placed`` [(x, y, r)]. Returns a list or None."""
    x0, x1, y0, y1 = box
    lo_x, hi_x, lo_y, hi_y = x0 + radius, x1 - radius, y0 + radius, y1 - radius
    if lo_x > hi_x or lo_y > hi_y:
        return None
    out = list(placed)
    centres = []
    for _ in range(count):
        for _ in range(tries):
            x, y = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
            if all((x - px) ** 2 + (y - py) ** 2 >= (radius + pr + GAP) ** 2 for px, py, pr in out):
                break
        else:
            return None
        out.append((x, y, radius))
        centres.append((round(x, 2), round(y, 2)))
    return centres


def sample_scene(rng: np.random.Generator, resolution: int = 64, max_groups: int = 2) -> Scene:
    """Sample a scene: 1..max_groups groups (max_groups <= 2), counts 1-3, non-overlapping items.

    A group that does not fit (three large items in half a 32 px picture) is retried small, then with one item
    fewer; the scene records what was actually placed, so caption and pixels always agree."""
    if not 1 <= max_groups <= 2:
        raise ValueError(f"max_groups must be 1 or 2, got {max_groups}")
    n_groups = int(rng.integers(1, max_groups + 1))
    shapes = rng.choice(len(SHAPES), size=n_groups, replace=False)
    res = float(resolution)
    margin = 1.0
    full = (margin, res - 1 - margin, margin, res - 1 - margin)
    relation = None
    boxes = [full]
    if n_groups == 2:
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        h = res / 2
        first, second = {
            "left of": ((margin, h - 1, margin, res - 1 - margin), (h + 1, res - 1 - margin, margin, res - 1 - margin)),
            "above": ((margin, res - 1 - margin, margin, h - 1), (margin, res - 1 - margin, h + 1, res - 1 - margin)),
            "below": ((margin, res - 1 - margin, h + 1, res - 1 - margin), (margin, res - 1 - margin, margin, h - 1)),
        }[relation]
        boxes = [first, second]
    objects, placed = [], []
    for g in range(n_groups):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        count = int(rng.integers(1, 4))
        centres = None
        while centres is None:
            radius = max(2.0, SIZES[size] * res)
            centres = _place_group(rng, count, radius, boxes[g], placed)
            if centres is None:
                if size != "small":
                    size = "small"
                elif count > 1:
                    count -= 1
                else:
                    raise RuntimeError(f"cannot place an object at resolution {resolution}")
        placed += [(x, y, radius) for x, y in centres]
        objects.append(SceneObject(SHAPES[int(shapes[g])], colour, size, count, tuple(centres), radius))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    background_colour = list(BACKGROUND_COLOURS)[int(rng.integers(len(BACKGROUND_COLOURS)))]
    period = int(rng.integers(max(4, resolution // 10), max(5, resolution // 6) + 1))
    return Scene(tuple(objects), background, background_colour, resolution, relation, period)


# ------------------------------------------------------------------------------------------------ captions
def background_phrase(scene: Scene) -> str:
    """"plain black background" or "striped background" (texture colours are not named)."""
    if scene.background == "plain":
        return f"plain {scene.background_colour} background"
    return f"{scene.background} background"


def caption(scene: Scene) -> str:
    """Natural-language caption, e.g. "two large red circles left of a small blue square on a striped background"."""
    text = scene.objects[0].phrase
    if len(scene.objects) == 2:
        text += f" {scene.relation} {scene.objects[1].phrase}"
    return f"{text} on a {background_phrase(scene)}"


# ------------------------------------------------------------------------------------------------ rendering
@lru_cache(maxsize=8)
def _grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) float32 coordinate grids of shape (H, W)."""
    ys, xs = np.mgrid[0:resolution, 0:resolution].astype(np.float32)
    return ys, xs


def shape_mask(shape: str, centre: tuple[float, float], radius: float, resolution: int) -> np.ndarray:
    """(H, W) bool pixels of one item; every pixel lies within ``radius`` of ``centre``."""
    ys, xs = _grid(resolution)
    dx, dy = xs - centre[0], ys - centre[1]
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = 0.7 * radius  # corner at 0.99 r
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # pointing up, vertices on the bounding circle
        return (dy <= 0.5 * radius) & (np.abs(dx) <= (dy + radius) * 0.5774)
    if shape == "star":  # five points, one up; polar radius interpolated between outer and inner radius
        d2 = dx * dx + dy * dy
        angle = np.arctan2(dy, dx) + np.pi / 2
        t = np.mod(angle, 2 * np.pi / 5) / (2 * np.pi / 5)
        bound = radius * (0.45 + 0.55 * np.abs(2 * t - 1))
        return d2 <= bound * bound
    raise ValueError(f"unknown shape {shape!r}")


def item_masks(scene: Scene, group: int) -> list[np.ndarray]:
    """(H, W) bool mask of each item of ``scene.objects[group]``, in ``centres`` order."""
    obj = scene.objects[group]
    return [shape_mask(obj.shape, c, obj.radius, scene.resolution) for c in obj.centres]


def object_masks(scene: Scene) -> dict[int, np.ndarray]:
    """Group index -> (H, W) bool mask of exactly that group's pixels in :func:`render`."""
    return {g: np.logical_or.reduce(item_masks(scene, g)) for g in range(len(scene.objects))}


def render_background(scene: Scene) -> np.ndarray:
    """(H, W, 3) uint8 background alone (what :func:`render` shows where no object is)."""
    n, p = scene.resolution, scene.texture_period
    base, second = BACKGROUND_COLOURS[scene.background_colour]
    image = np.empty((n, n, 3), np.uint8)
    image[:] = base
    if scene.background == "plain":
        return image
    ys, xs = _grid(n)
    if scene.background == "striped":  # diagonal stripes, half a period wide
        texture = np.mod(xs + ys, p) < p / 2
    elif scene.background == "checkered":
        texture = (np.floor(xs / p) + np.floor(ys / p)) % 2 == 1
    else:  # dotted: a dot of radius p/4 in every p x p cell
        cx, cy = np.mod(xs, p) - (p - 1) / 2, np.mod(ys, p) - (p - 1) / 2
        texture = cx * cx + cy * cy <= (p / 4) ** 2
    image[texture] = second
    return image


def render(scene: Scene, colours: dict[int, str] | None = None, skip: set[tuple[int, int]] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 picture. ``colours`` overrides group colours; ``skip`` omits (group, item) pairs (used by the
    mismatch injectors' documentation and tests; the default renders the scene as captioned)."""
    image = render_background(scene)
    for g, obj in enumerate(scene.objects):
        rgb = COLOURS[(colours or {}).get(g, obj.colour)]
        for k, mask in enumerate(item_masks(scene, g)):
            if skip is None or (g, k) not in skip:
                image[mask] = rgb
    return image


HELD_OUT_BUCKETS = 10
"""One caption in ``HELD_OUT_BUCKETS`` (by a stable hash of its text) is held out: tiny-sd v2 never trains on it,
and the generator's benchmarks ask for these captions only."""


def held_out_caption(text: str) -> bool:
    """Whether ``text`` is one of the held-out captions (CRC-32 of its UTF-8 bytes divisible by 10)."""
    return zlib.crc32(text.encode("utf-8")) % HELD_OUT_BUCKETS == 0


def held_out_scenes(count: int, seed: int, resolution: int = 64, keep=None) -> list[Scene]:
    """``count`` scenes whose captions are held out (and ``keep(scene)`` is true, when given), drawn in order from
    ``np.random.default_rng(seed)``; ValueError when 2000 * count draws do not give them."""
    rng = np.random.default_rng(seed)
    found: list[Scene] = []
    for _ in range(2000 * max(1, count)):
        if len(found) == count:
            break
        scene = sample_scene(rng, resolution)
        if held_out_caption(caption(scene)) and (keep is None or keep(scene)):
            found.append(scene)
    if len(found) < count:
        raise ValueError(f"only {len(found)} of {count} held-out scenes in {2000 * max(1, count)} draws")
    return found


def generate(seed: int, resolution: int = 64) -> tuple[np.ndarray, str, Scene]:
    """(image (H, W, 3) uint8, caption, scene), deterministic from ``seed``."""
    scene = sample_scene(np.random.default_rng(seed), resolution)
    return render(scene), caption(scene), scene
