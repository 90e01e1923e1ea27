"""Defect injectors for the toy world, each with its exact ground-truth mask (G-Refine factors, METHODS.md 1.2-1.3).

Every injector is ``inject_<kind>(image, scene, rng) -> Defect``: ``image`` is an ``(H, W, 3) uint8`` picture of
``scene`` (possibly already carrying other defects), the result is a new array (the input is not modified).

Mask contract, checked by the tests: ``mask`` is ``(H, W) bool``; every pixel outside it is bit-identical to the
input; every pixel inside it differs from the input in at least one channel. So a mask is "where the picture was
actually damaged", never a loose bounding box.

Factors and kinds
- technical: ``blur_patch`` (Gaussian blur in a disc over an object's edge; applied only where it changes a pixel by
  at least :data:`MATERIAL` levels, so the mask is the edge band inside the disc), ``noise_patch`` (strong
  Gaussian noise in a disc or rectangle; mask = the patch pixels whose value changed, nearly all of it).
- rational: ``broken_shape`` (one item cut along a line through its centre with one half displaced, or smeared
  sideways with a fading trail; mask = changed pixels).
- natural: ``colour_cast`` (one item turned a sickly mix with an unnatural cast colour, plus a weaker tint of the
  same colour on a ring of its surroundings; mask = changed pixels of that disc).
- alignment (caption/picture mismatch; the caption stays the scene's caption): ``missing_object`` (a group painted
  over with the background; mask = the group's pixels), ``wrong_colour`` (a group in another vocabulary colour;
  mask = the group), ``wrong_count`` (one item of a group with count >= 2 removed; mask = that item's pixels).
  ``target_noun`` is the affected group's noun as written in the caption ("circles").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.ndimage import binary_erosion, gaussian_filter

from . import scenes
from .scenes import COLOURS, Scene

MATERIAL = 8  # blur_patch: minimum change (0-255 levels, max over channels) for a pixel to count as blurred
FACTORS = ("technical", "rational", "natural", "alignment")
PERCEPTUAL_FACTORS = ("technical", "rational", "natural")
KIND_FACTOR = {
    "blur_patch": "technical",
    "noise_patch": "technical",
    "broken_shape": "rational",
    "colour_cast": "natural",
    "missing_object": "alignment",
    "wrong_colour": "alignment",
    "wrong_count": "alignment",
}
KINDS = tuple(KIND_FACTOR)
CAST_COLOURS = ((150, 160, 40), (230, 60, 200), (60, 220, 220), (170, 100, 40))  # olive, magenta, cyan, brown


@dataclass
class Defect:
    """One injected defect. image: (H, W, 3) uint8 defective picture; mask: (H, W) bool exact changed pixels;
    factor: one of :data:`FACTORS`; kind: one of :data:`KINDS`; caption: the (unchanged) scene caption;
    target_noun: noun of the affected group as in the caption; shown: the scene the defective picture actually
    shows (alignment defects: without the removed group/item or with the new colour; else the input scene), so
    later injectors target objects that are still there."""

    image: np.ndarray
    mask: np.ndarray
    factor: str
    kind: str
    caption: str
    target_noun: str | None = None
    shown: Scene | None = None


def _defect(kind, old, new, scene, group, shown=None) -> Defect:
    mask = (new != old).any(axis=-1)
    if not mask.any():
        raise RuntimeError(f"{kind}: the injection changed no pixel")
    noun = scene.objects[group].noun
    return Defect(new, mask, KIND_FACTOR[kind], kind, scenes.caption(scene), noun, shown or scene)


def _pick_item(scene: Scene, rng) -> tuple[int, int]:
    group = int(rng.integers(len(scene.objects)))
    return group, int(rng.integers(scene.objects[group].count))


def _disc(centre, radius, resolution) -> np.ndarray:
    return scenes.shape_mask("circle", centre, radius, resolution)


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate a (H, W) mask by (dy, dx) pixels; what leaves the frame is dropped."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    source = mask[max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = source
    return out


# ------------------------------------------------------------------------------------------------ technical
def inject_blur_patch(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> Defect:
    """Gaussian blur (sigma 1.5-3 px) in a disc (radius 12-22 % of the side) centred on an item's edge pixel."""
    n = scene.resolution
    sigma = float(rng.uniform(1.5, 3.0))
    blurred = np.rint(gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0)))  # (H, W, 3)
    changed = np.abs(blurred - image).max(axis=-1) >= MATERIAL
    for _ in range(8):  # an edge may have been flattened by an earlier defect: try other items
        group, item = _pick_item(scene, rng)
        m = scenes.item_masks(scene, group)[item]
        edge = np.argwhere(m & ~binary_erosion(m))  # (K, 2) rows, cols
        y, x = edge[int(rng.integers(len(edge)))]
        patch = _disc((float(x), float(y)), float(rng.uniform(0.12, 0.22)) * n, n)
        material = patch & changed
        if material.any():
            break
    new = image.copy()
    new[material] = blurred[material].astype(np.uint8)
    return _defect("blur_patch", image, new, scene, group)


def inject_noise_patch(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> Defect:
    """Gaussian noise (sigma 35-60 levels) in a disc or square (half-size 10-20 % of the side) near an item."""
    n = scene.resolution
    group, item = _pick_item(scene, rng)
    cx, cy = scene.objects[group].centres[item]
    cx, cy = cx + rng.uniform(-3, 3), cy + rng.uniform(-3, 3)
    half = float(rng.uniform(0.10, 0.20)) * n
    if rng.random() < 0.5:
        patch = _disc((cx, cy), half, n)
    else:
        ys, xs = scenes._grid(n)
        patch = (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    noise = rng.normal(0.0, float(rng.uniform(35, 60)), size=image.shape)
    noisy = np.clip(np.rint(image + noise), 0, 255).astype(np.uint8)
    new = image.copy()
    new[patch] = noisy[patch]
    return _defect("noise_patch", image, new, scene, group)


# ------------------------------------------------------------------------------------------------ rational
def inject_broken_shape(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> Defect:
    """Break one item: either cut it along a random line through its centre and move one half 2-4 px outwards
    (the hole shows the background), or smear it sideways with a 4-8 px fading trail of its colour."""
    n = scene.resolution
    group, item = _pick_item(scene, rng)
    obj = scene.objects[group]
    m = scenes.item_masks(scene, group)[item]
    rgb = np.array(COLOURS[obj.colour], np.float32)
    new = image.copy()
    if rng.random() < 0.5:  # displaced half
        theta = float(rng.uniform(0, 2 * np.pi))
        nx, ny = np.cos(theta), np.sin(theta)
        ys, xs = scenes._grid(n)
        cx, cy = obj.centres[item]
        half = m & ((xs - cx) * nx + (ys - cy) * ny > 0)
        dist = float(rng.uniform(2, 4.5))
        dy, dx = int(round(ny * dist)), int(round(nx * dist))
        if dy == 0 and dx == 0:
            dx = 2
        background = scenes.render_background(scene)
        new[half] = background[half]
        new[_shift(half, dy, dx)] = rgb.astype(np.uint8)
    else:  # smear
        length = int(rng.integers(4, 9))
        direction = 1 if rng.random() < 0.5 else -1
        alpha = np.zeros((n, n), np.float32)
        for s in range(1, length + 1):
            alpha = np.maximum(alpha, _shift(m, 0, s * direction) * (1 - s / (length + 1)))
        alpha[m] = 0
        a = alpha[..., None]
        new = np.rint(image * (1 - a) + rgb * a).astype(np.uint8)
    return _defect("broken_shape", image, new, scene, group)


# ------------------------------------------------------------------------------------------------ natural
def inject_colour_cast(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> Defect:
    """Mix one item 55-75 % with an unnatural cast colour and tint a 2-5 px ring around it 25-40 % with it."""
    n = scene.resolution
    group, item = _pick_item(scene, rng)
    obj = scene.objects[group]
    m = scenes.item_masks(scene, group)[item]
    region = _disc(obj.centres[item], obj.radius + float(rng.uniform(2, 5)), n)
    cast = np.array(CAST_COLOURS[int(rng.integers(len(CAST_COLOURS)))], np.float32)
    alpha = np.zeros((n, n, 1), np.float32)
    alpha[region] = rng.uniform(0.25, 0.40)
    alpha[m] = rng.uniform(0.55, 0.75)
    new = np.rint(image * (1 - alpha) + cast * alpha).astype(np.uint8)
    return _defect("colour_cast", image, new, scene, group)


# ------------------------------------------------------------------------------------------------ alignment
def inject_missing_object(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> Defect:
    """Paint one whole group over with the background (the caption still names it)."""
    group = int(rng.integers(len(scene.objects)))
    mask = scenes.object_masks(scene)[group]
    new = image.copy()
    new[mask] = scenes.render_background(scene)[mask]
    shown = replace(scene, objects=scene.objects[:group] + scene.objects[group + 1 :], relation=None)
    return _defect("missing_object", image, new, scene, group, shown)


def inject_wrong_colour(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> Defect:
    """Repaint one whole group in another vocabulary colour."""
    group = int(rng.integers(len(scene.objects)))
    others = [c for c in COLOURS if c != scene.objects[group].colour]
    mask = scenes.object_masks(scene)[group]
    new = image.copy()
    colour = others[int(rng.integers(len(others)))]
    new[mask] = COLOURS[colour]
    objects = list(scene.objects)
    objects[group] = replace(objects[group], colour=colour)
    return _defect("wrong_colour", image, new, scene, group, replace(scene, objects=tuple(objects)))


def inject_wrong_count(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> Defect:
    """Remove one item of a group with count >= 2 (ValueError if the scene has none, see :func:`applicable`)."""
    groups = [g for g, o in enumerate(scene.objects) if o.count >= 2]
    if not groups:
        raise ValueError("wrong_count needs a group with count >= 2")
    group = groups[int(rng.integers(len(groups)))]
    obj = scene.objects[group]
    item = int(rng.integers(obj.count))
    mask = scenes.item_masks(scene, group)[item]
    new = image.copy()
    new[mask] = scenes.render_background(scene)[mask]
    objects = list(scene.objects)
    objects[group] = replace(obj, count=obj.count - 1, centres=obj.centres[:item] + obj.centres[item + 1 :])
    return _defect("wrong_count", image, new, scene, group, replace(scene, objects=tuple(objects)))


INJECTORS = {kind: globals()[f"inject_{kind}"] for kind in KINDS}


def applicable(kind: str, scene: Scene) -> bool:
    """Whether ``kind`` can be injected into ``scene``: every kind needs an object, wrong_count a group with
    count >= 2."""
    return bool(scene.objects) and (kind != "wrong_count" or any(o.count >= 2 for o in scene.objects))


# ------------------------------------------------------------------------------------------------ labels
def quality_labels(defects: list[Defect], resolution: int) -> dict[str, float]:
    """Per factor: fraction in [0, 1] of the picture covered by that factor's masks (union); "overall": 1 minus the
    fraction covered by any perceptual defect (technical, rational, natural), so 1 = perfect. Alignment defects do
    not lower "overall": they are not visible without the caption."""
    area = float(resolution * resolution)
    union = {f: np.zeros((resolution, resolution), bool) for f in FACTORS}
    for d in defects:
        union[d.factor] |= d.mask
    labels = {f: float(union[f].sum()) / area for f in FACTORS}
    perceptual = np.logical_or.reduce([union[f] for f in PERCEPTUAL_FACTORS])
    labels["overall"] = 1.0 - float(perceptual.sum()) / area
    return labels


def make_example(
    seed: int, resolution: int = 64, kinds: tuple[str, ...] | None = None, max_defects: int = 2
) -> tuple[np.ndarray, str, dict[str, np.ndarray], dict[str, float]]:
    """Clean scene (the same as ``scenes.generate(seed, resolution)``) plus 0..max_defects distinct random defects
    drawn from ``kinds`` (default all), at most one alignment defect, applied first so the later local defects
    stay visible and target objects still shown (a local defect left with no object, e.g. after the only group
    went missing, is skipped). Returns (image (H, W, 3) uint8, caption, {kind: (H, W) bool mask}, quality labels)."""
    rng = np.random.default_rng(seed)
    scene = scenes.sample_scene(rng, resolution)
    image, text = scenes.render(scene), scenes.caption(scene)
    pool = [k for k in (kinds or KINDS) if applicable(k, scene)]
    chosen: list[str] = []
    for k in rng.permutation(pool)[: int(rng.integers(0, max_defects + 1))]:
        if KIND_FACTOR[k] == "alignment" and any(KIND_FACTOR[c] == "alignment" for c in chosen):
            continue
        chosen.append(str(k))
    chosen.sort(key=lambda k: KIND_FACTOR[k] != "alignment")
    applied = []
    shown = scene
    for k in chosen:
        if not applicable(k, shown):
            continue
        d = INJECTORS[k](image, shown, rng)
        d.caption = text
        image, shown = d.image, d.shown
        applied.append(d)
    return image, text, {d.kind: d.mask for d in applied}, quality_labels(applied, resolution)
