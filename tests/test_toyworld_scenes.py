"""Tests for the toy world (benchmarks/toyworld): generator determinism, captions, exact masks, defect injectors."""

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, so `benchmarks` imports

from benchmarks.toyworld import defects, scenes  # noqa: E402

SEEDS = range(60)
LOCAL_KINDS = ("blur_patch", "noise_patch", "broken_shape", "colour_cast")


def test_generate_is_deterministic():
    for seed in (0, 1, 17):
        a, cap_a, scene_a = scenes.generate(seed)
        b, cap_b, scene_b = scenes.generate(seed)
        assert np.array_equal(a, b) and cap_a == cap_b and scene_a == scene_b
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    images = [scenes.generate(seed)[0] for seed in range(10)]
    assert all(not np.array_equal(images[i], images[j]) for i in range(10) for j in range(i + 1, 10))
    assert scenes.generate(3, resolution=32)[0].shape == (32, 32, 3)


@pytest.mark.parametrize("resolution", [64, 32])
def test_caption_matches_scene(resolution):
    for seed in SEEDS:
        _, text, scene = scenes.generate(seed, resolution)
        words = text.split()
        assert 1 <= len(scene.objects) <= 2
        for obj in scene.objects:
            plural = "s" if obj.count > 1 else ""
            phrase = f"{scenes.COUNT_WORDS[obj.count]} {obj.size} {obj.colour} {obj.shape}{plural}"
            assert phrase in text
            assert len(obj.centres) == obj.count
        colours = [w for w in words if w in scenes.COLOURS]
        assert colours == [o.colour for o in scene.objects]  # no other colour word in the caption
        assert text.endswith(f"on a {scenes.background_phrase(scene)}")
        if len(scene.objects) == 2:
            assert scene.objects[0].shape != scene.objects[1].shape
            assert f" {scene.relation} " in text
            (x0, y0), (x1, y1) = np.array(scene.objects[0].centres).T, np.array(scene.objects[1].centres).T
            if scene.relation == "left of":
                assert x0.max() < x1.min()
            elif scene.relation == "above":
                assert y0.max() < y1.min()
            else:
                assert y0.min() > y1.max()


def test_caption_parses_into_one_phrase_per_group():
    from comfyui_refinery.core.prompt_parsing import parse_prompt

    for seed in range(25):
        _, text, scene = scenes.generate(seed)
        nouns = [p.noun for p in parse_prompt(text).phrases]
        assert nouns == [o.noun for o in scene.objects] + ["background"], text


def test_object_masks_are_exact():
    for seed in SEEDS:
        image, _, scene = scenes.generate(seed)
        background = scenes.render_background(scene)
        masks = scenes.object_masks(scene)
        union = np.zeros(image.shape[:2], bool)
        for g, mask in masks.items():
            assert mask.any() and not (mask & union).any()  # non-empty, disjoint
            union |= mask
            assert (image[mask] == scenes.COLOURS[scene.objects[g].colour]).all()
            for item in scenes.item_masks(scene, g):
                assert item.any()
        assert np.array_equal(image[~union], background[~union])
        # no object colour appears outside the objects
        for g, obj in enumerate(scene.objects):
            assert not (image[~union] == scenes.COLOURS[obj.colour]).all(-1).any()


@pytest.mark.parametrize("kind", defects.KINDS)
def test_injector_masks_are_exact(kind):
    n_checked = 0
    for seed in SEEDS:
        image, text, scene = scenes.generate(seed)
        if not defects.applicable(kind, scene):
            continue
        before = image.copy()
        d = defects.INJECTORS[kind](image, scene, np.random.default_rng(seed))
        n_checked += 1
        assert np.array_equal(image, before)  # input untouched
        assert d.kind == kind and d.factor == defects.KIND_FACTOR[kind] and d.caption == text
        assert d.image.shape == image.shape and d.image.dtype == np.uint8
        assert d.mask.shape == image.shape[:2] and d.mask.dtype == bool and d.mask.any()
        assert np.array_equal(d.image[~d.mask], image[~d.mask])  # outside: bit-identical
        assert (d.image[d.mask] != image[d.mask]).any(-1).all()  # inside: every pixel changed
        assert d.target_noun in [o.noun for o in scene.objects]
        masks = scenes.object_masks(scene)
        if kind == "missing_object":
            group = next(g for g, m in masks.items() if np.array_equal(m, d.mask))
            assert np.array_equal(d.image[d.mask], scenes.render_background(scene)[d.mask])
            assert d.target_noun == scene.objects[group].noun
        if kind == "wrong_colour":
            assert any(np.array_equal(m, d.mask) for m in masks.values())
            colours = {tuple(c) for c in d.image[d.mask]}
            assert len(colours) == 1 and colours.pop() in set(scenes.COLOURS.values())
        if kind == "wrong_count":
            items = [m for g in masks for m in scenes.item_masks(scene, g) if scene.objects[g].count >= 2]
            assert any(np.array_equal(m, d.mask) for m in items)
            assert np.array_equal(d.image[d.mask], scenes.render_background(scene)[d.mask])
        if kind in ("colour_cast", "broken_shape", "blur_patch"):
            union = binary_dilation(np.logical_or.reduce(list(masks.values())))  # a smear trail starts next to it
            assert (d.mask & union).any()  # the defect touches an object
    assert n_checked >= 10


def test_quality_labels():
    image, _, scene = scenes.generate(5)
    assert defects.quality_labels([], 64) == {"technical": 0, "rational": 0, "natural": 0, "alignment": 0, "overall": 1}
    rng = np.random.default_rng(0)
    applied, overall = [], 1.0
    for kind in LOCAL_KINDS:
        d = defects.INJECTORS[kind](image, scene, rng)
        image = d.image
        applied.append(d)
        labels = defects.quality_labels(applied, 64)
        assert all(0.0 <= v <= 1.0 for v in labels.values())
        assert labels[d.factor] >= d.mask.mean() - 1e-9
        assert labels["overall"] <= overall
        overall = labels["overall"]
    assert overall < 1.0
    d = defects.inject_missing_object(image, scene, rng)
    labels = defects.quality_labels(applied + [d], 64)
    assert labels["alignment"] == pytest.approx(d.mask.mean()) and labels["overall"] == overall


def test_make_example():
    counts = {}
    for seed in range(80):
        image, text, masks, labels = defects.make_example(seed)
        again = defects.make_example(seed)
        assert np.array_equal(image, again[0]) and text == again[1] and labels == again[3]
        assert text == scenes.generate(seed)[1]
        assert len(masks) <= 2 and sum(defects.KIND_FACTOR[k] == "alignment" for k in masks) <= 1
        assert all(0.0 <= v <= 1.0 for v in labels.values())
        if not any(defects.KIND_FACTOR[k] != "alignment" for k in masks):
            assert labels["overall"] == 1.0
        else:
            assert labels["overall"] < 1.0
        counts[len(masks)] = counts.get(len(masks), 0) + 1
    assert set(counts) == {0, 1, 2}
    _, _, masks, _ = defects.make_example(1, kinds=("noise_patch",), max_defects=1)
    assert set(masks) <= {"noise_patch"}
