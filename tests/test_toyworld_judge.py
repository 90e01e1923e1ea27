"""The toy world's attribute judge (benchmarks/toyworld/judge.py) must be right on rendered scenes before it judges
anything, and must notice each attribute that is wrong."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from comfyui_refinery.benchmarks.toyworld import judge, scenes


def scene_where(keep, seed: int = 0) -> scenes.Scene:
    rng = np.random.default_rng(seed)
    while True:
        scene = scenes.sample_scene(rng)
        if keep(scene):
            return scene


def test_the_judge_finds_every_attribute_of_rendered_scenes():
    wrong = [seed for seed in range(300)
             if not judge.judge(*scenes.generate(9_100_000 + seed)[:2]).all_right]
    assert wrong == []


def test_caption_parsing_covers_the_grammar_and_refuses_other_text():
    spec = judge.parse_caption("two large red circles left of a small blue square on a striped background")
    assert spec.groups == (judge.GroupSpec(2, "large", "red", "circle"), judge.GroupSpec(1, "small", "blue", "square"))
    assert spec.relation == "left of" and spec.background == "striped"
    assert judge.parse_caption("a small white star on a plain black background").groups[0].shape == "star"
    for text in ("a red fox on a mossy rock", "a small pink circle on a plain grey background", ""):
        with pytest.raises(ValueError, match="caption|colour"):
            judge.parse_caption(text)


def test_each_wrong_attribute_is_noticed():
    single = scene_where(lambda s: len(s.objects) == 1 and s.objects[0].count == 1 and s.background == "plain", 1)
    caption, obj = scenes.caption(single), single.objects[0]

    def verdict(picture_scene, colours=None):
        return judge.judge(scenes.render(picture_scene, colours=colours), caption).groups[0]

    assert verdict(single).all_right
    other_colour = next(c for c in scenes.COLOURS if c != obj.colour)
    assert not verdict(single, colours={0: other_colour}).colour_right
    other_shape = next(s for s in ("square", "circle") if s != obj.shape)
    assert not verdict(replace(single, objects=(replace(obj, shape=other_shape),))).shape_right
    other_size = "small" if obj.size == "large" else "large"
    resized = replace(obj, size=other_size, radius=scenes.SIZES[other_size] * single.resolution)
    assert not verdict(replace(single, objects=(resized,))).size_right
    far = (single.resolution - 1 - obj.centres[0][0], single.resolution - 1 - obj.centres[0][1])
    if (far[0] - obj.centres[0][0]) ** 2 + (far[1] - obj.centres[0][1]) ** 2 > (2 * obj.radius + 3) ** 2:
        doubled = replace(obj, count=2, centres=(obj.centres[0], far))
        found = verdict(replace(single, objects=(doubled,)))
        assert found.found == 2 and not found.count_right and found.colour_right


def test_a_missing_item_and_a_swapped_relation_are_noticed():
    pair = scene_where(lambda s: len(s.objects) == 2 and s.objects[0].count >= 2 and s.relation == "left of", 2)
    caption = scenes.caption(pair)
    assert judge.judge(scenes.render(pair), caption).all_right
    missing = judge.judge(scenes.render(pair, skip={(0, 0)}), caption)
    assert not missing.groups[0].count_right and missing.groups[1].all_right
    mirrored = replace(pair, objects=tuple(replace(o, centres=tuple((pair.resolution - 1 - x, y) for x, y in o.centres))
                                           for o in pair.objects))
    assert judge.judge(scenes.render(mirrored), caption).relation_right is False


def test_attribute_judge_reward_interface():
    reward = judge.AttributeJudge()
    chosen = [scenes.generate(9_200_000 + seed) for seed in range(4)]
    images = torch.from_numpy(np.stack([image for image, _, _ in chosen])).float() / 255
    captions = [caption for _, caption, _ in chosen]
    assert reward.score(images, captions).tolist() == [1.0] * 4
    blank = torch.full_like(images, 0.5)
    assert reward.score(blank, captions).max() < 0.5  # nothing drawn: at most the relation can hold
    with pytest.raises(ValueError, match="prompts"):
        reward.score(images, captions[:2])
