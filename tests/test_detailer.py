"""Detailer geometry (core/detailer.py) against hand-worked boxes, sizes and pastes."""

from __future__ import annotations

import pytest
import torch

from comfyui_refinery.core.detailer import (
    DetailerSettings,
    crop_box,
    paste,
    region_crops,
    resize_mask,
    split_regions,
    upscaled_size,
)


def test_regions_split_by_their_bounding_box_share_of_the_picture():
    mask = torch.zeros(64, 64)
    mask[5:9, 5:9] = 1  # box 16 px = 0.4 % of 4096: small
    mask[40:60, 10:50] = 1  # box 800 px = 19.5 %: large
    small, large = split_regions(mask, DetailerSettings(max_region_fraction=0.05))
    assert small.sum() == 16 and large.sum() == 800 and torch.equal(small + large, mask)
    everything_small, nothing_large = split_regions(mask, DetailerSettings(max_region_fraction=1.0))
    assert torch.equal(everything_small, mask) and nothing_large.sum() == 0


def test_crop_box_grows_squares_and_clips_by_hand():
    settings = DetailerSettings(context=0.5, min_context=8)
    # a 10 x 4 box at (30, 30): padding max(8, ceil(0.5 * 10)) = 8, side 10 + 16 = 26, centred on (35, 32)
    assert crop_box((30, 30, 10, 4), (100, 100), settings) == (22, 19, 26, 26)
    # at the corner the square is shifted inside the picture
    assert crop_box((0, 0, 4, 4), (100, 100), settings) == (0, 0, 20, 20)
    # a picture smaller than the square: the crop is the whole side
    assert crop_box((2, 2, 4, 4), (12, 100), settings) == (0, 0, 12, 20)


def test_upscaled_size_keeps_the_aspect_on_the_latent_grid():
    settings = DetailerSettings(native_resolution=512, multiple=8)
    assert upscaled_size((20, 20), settings) == (512, 512)
    assert upscaled_size((12, 20), settings) == (312, 512)  # 12 * 25.6 = 307.2 -> 312
    assert upscaled_size((600, 300), settings) == (600, 304)  # larger than native: never shrunk, snapped up


def test_one_pixel_and_border_regions_get_crops_and_overlapping_crops_split_the_paste():
    mask = torch.zeros(32, 32)
    mask[0, 0] = 1  # a 1-pixel region at the corner
    mask[10, 10] = 1
    mask[10, 14] = 1  # near the second one: their crops overlap
    settings = DetailerSettings(max_region_fraction=1.0, native_resolution=64, min_context=4, context=0.0)
    crops = region_crops(mask, mask, settings)
    assert [crop.box for crop in crops] == [(0, 0, 9, 9), (6, 6, 9, 9), (6, 10, 9, 9)]
    assert all(crop.mask.sum() == 1 and crop.size == (64, 64) for crop in crops)
    weight = torch.zeros(32, 32)
    for crop in crops:  # every region pixel is pasted exactly once
        top, left, height, width = crop.box
        weight[top:top + height, left:left + width] += crop.feathered
    assert torch.equal(weight, mask)


def test_paste_changes_only_pixels_under_the_feathered_weight():
    picture = torch.rand(16, 16, 3)
    mask = torch.zeros(16, 16)
    mask[6:8, 6:8] = 1
    feathered = mask.clone()
    feathered[5, 6:8] = 0.5
    (crop,) = region_crops(mask, feathered, DetailerSettings(max_region_fraction=1.0, native_resolution=32,
                                                            min_context=2, context=0.0))
    refined_crop = torch.ones(crop.box[2], crop.box[3], 3)
    result = paste(picture, refined_crop, crop)
    changed = (result != picture).any(dim=-1)
    assert torch.equal(changed, feathered > 0)
    torch.testing.assert_close(result[5, 6], 0.5 * picture[5, 6] + 0.5)
    with pytest.raises(ValueError, match="resize it back to the box"):
        paste(picture, torch.ones(3, 3, 3), crop)


def test_mask_resizing_never_loses_a_region():
    mask = torch.zeros(9, 9)
    mask[4, 4] = 1
    assert resize_mask(mask, (3, 3)).sum() == 1 and resize_mask(mask, (64, 64)).sum() > 0


def test_settings_errors_are_clear():
    with pytest.raises(ValueError, match="native_resolution \\(4\\) is below the latent factor \\(8\\)"):
        DetailerSettings(native_resolution=4)
    with pytest.raises(ValueError, match="max_region_fraction must be in \\[0, 1\\]"):
        DetailerSettings(max_region_fraction=2.0)
