"""Tests for core/masks.py, each against a hand computation on tiny maps."""

import dataclasses
import math

import pytest
import torch

from comfyui_refinery.core.masks import (
    MaskSettings,
    binarize,
    defect_map,
    dilate,
    feather,
    gaussian_blur,
    keep_largest_regions,
    refine_mask,
    remove_small_regions,
    scale_to_resolution,
)


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def test_defect_map_hand_values():
    p = t([[[1.0, 0.5], [0.0, 0.9]]])
    a = t([[[0.0, 0.2], [0.5, 0.0]]])
    # 1 - P + A: [[0, 0.7], [1.5 -> 1, 0.1]]
    expected = t([[[0.0, 0.7], [1.0, 0.1]]])
    torch.testing.assert_close(defect_map(p, a), expected)


def test_defect_map_shape_mismatch_message():
    with pytest.raises(ValueError, match=r"\(1, 4, 4\).*\(1, 2, 2\).*resize"):
        defect_map(torch.zeros(1, 4, 4), torch.zeros(1, 2, 2))


def test_defect_map_nan_names_input():
    a = torch.zeros(1, 2, 2)
    a[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="alignment_map contains NaN"):
        defect_map(torch.zeros(1, 2, 2), a)
    p = torch.zeros(1, 2, 2)
    p[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="perceptual_map contains NaN or inf"):
        defect_map(p, torch.zeros(1, 2, 2))


def test_bad_rank_rejected():
    with pytest.raises(ValueError, match=r"\(B, H, W\).*\(1, 1, 2, 2\)"):
        binarize(torch.zeros(1, 1, 2, 2))


def test_two_d_map_is_batch_of_one():
    out = binarize(t([[0.2, 0.8]]))
    assert out.shape == (1, 1, 2)
    torch.testing.assert_close(out, t([[[0.0, 1.0]]]))


def test_binarize_threshold_edge():
    v = t([[[0.3, 0.5, 0.50001, 1.0]]])
    torch.testing.assert_close(binarize(v, 0.5), t([[[0.0, 0.0, 1.0, 1.0]]]))
    torch.testing.assert_close(binarize(t([[[0.0, 0.1]]]), 0.0), t([[[0.0, 1.0]]]))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_binarize_threshold_range(bad):
    with pytest.raises(ValueError, match="threshold must be in"):
        binarize(torch.zeros(1, 2, 2), bad)


def grid(rows: str) -> torch.Tensor:
    """A (1, H, W) 0/1 mask drawn as text, rows top to bottom separated by "/": "110/000" is 2 x 3."""
    return torch.tensor([[[float(pixel) for pixel in row] for row in rows.split("/")]])


def test_remove_small_regions_sizes_1_and_4():
    m = grid("10000/00000/00110/00110/00000")  # a single pixel, a 2x2 block
    torch.testing.assert_close(remove_small_regions(m, 2), grid("00000/00000/00110/00110/00000"))
    torch.testing.assert_close(remove_small_regions(m, 5), torch.zeros_like(m))
    torch.testing.assert_close(remove_small_regions(m, 0), m)


def test_eight_connectivity_diagonal_is_one_region():
    # A diagonal of 3 pixels is one region of size 3 (4-connectivity would give three of size 1).
    m = grid("10000/01000/00100/00000/00001")
    diagonal = grid("10000/01000/00100/00000/00000")
    torch.testing.assert_close(remove_small_regions(m, 2), diagonal)
    torch.testing.assert_close(keep_largest_regions(m, 1), diagonal)


def test_keep_largest_regions():
    m = grid("11010/11000/00000/11101/00001")  # a 2x2 block (4), a row of 3 (3), a pair at right (2), a single (1)
    torch.testing.assert_close(keep_largest_regions(m, 2), grid("11000/11000/00000/11100/00000"))
    torch.testing.assert_close(keep_largest_regions(m, 10), m)
    with pytest.raises(ValueError, match="max_regions must be an int >= 1"):
        keep_largest_regions(m, 0)


def test_dilate_single_pixel_radius_1_and_2():
    m = torch.zeros(1, 5, 5)
    m[0, 2, 2] = 1
    expected1 = torch.zeros(1, 5, 5)
    expected1[0, 1:4, 1:4] = 1
    torch.testing.assert_close(dilate(m, 1), expected1)
    # radius 2 disc: (r + 0.5)^2 = 6.25 keeps (2, 1) (5 <= 6.25) but not the corners (2, 2) (8 > 6.25)
    expected2 = torch.ones(1, 5, 5)
    for y, x in [(0, 0), (0, 4), (4, 0), (4, 4)]:
        expected2[0, y, x] = 0
    torch.testing.assert_close(dilate(m, 2), expected2)
    torch.testing.assert_close(dilate(m, 0), m)


def test_dilate_at_border_clips():
    torch.testing.assert_close(dilate(grid("1000/0000/0000"), 1), grid("1100/1100/0000"))


def test_gaussian_blur_constant_and_impulse():
    const = torch.full((1, 7, 9), 0.37)
    torch.testing.assert_close(gaussian_blur(const, 1.5), const)
    impulse = torch.zeros(1, 21, 21)
    impulse[0, 10, 10] = 1
    out = gaussian_blur(impulse, 1.0)  # kernel 7 lies fully inside
    assert math.isclose(out.sum().item(), 1.0, rel_tol=1e-5)
    # separable Gaussian: centre = (1 / sum_k exp(-k^2/2), k=-3..3)^2
    norm = sum(math.exp(-k * k / 2) for k in range(-3, 4))
    assert math.isclose(out[0, 10, 10].item(), 1 / norm**2, rel_tol=1e-5)
    assert math.isclose(out[0, 10, 11].item(), math.exp(-0.5) / norm**2, rel_tol=1e-5)
    torch.testing.assert_close(out[0], out[0].T)  # symmetric
    torch.testing.assert_close(gaussian_blur(impulse, 0.0), impulse)


def test_gaussian_blur_even_kernel_16_sigma_4():
    impulse = torch.zeros(1, 40, 40)
    impulse[0, 20, 20] = 1
    out = gaussian_blur(impulse, 4.0, kernel_size=16)
    assert out.shape == (1, 40, 40)
    assert math.isclose(out.sum().item(), 1.0, rel_tol=1e-5)
    const = torch.full((2, 8, 8), 0.6)  # smaller than the kernel: replicate fallback still preserves constants
    torch.testing.assert_close(gaussian_blur(const, 4.0, kernel_size=16), const)


def test_feather_is_one_on_mask_and_decreases_outward():
    m = torch.zeros(1, 9, 9)
    m[0, 3:6, 3:6] = 1
    f = feather(m, 2.0)
    assert torch.all(f[m > 0.5] == 1)
    row = f[0, 4, 5:]  # from the mask edge to the right border: distances 0, 1, 2, 3
    expected = torch.tensor([math.exp(-(d**2) / 8) for d in range(4)])
    torch.testing.assert_close(row, expected)
    assert torch.all(row[1:] < row[:-1])
    assert math.isclose(f[0, 0, 0].item(), math.exp(-(3**2 + 3**2) / 8), rel_tol=1e-6)
    torch.testing.assert_close(feather(m, 0.0), m)
    torch.testing.assert_close(feather(torch.zeros(1, 4, 4), 3.0), torch.zeros(1, 4, 4))


def test_batch_each_image_own_result():
    m = torch.zeros(3, 5, 5)
    m[0, 0, 0] = 1                 # single pixel
    m[1, 1:3, 1:3] = 1             # 2x2 block
    m[2, 4, 0] = 1
    m[2, 0, 2:5] = 1               # single + row of 3
    out = remove_small_regions(m, 2)
    torch.testing.assert_close(out[0], torch.zeros(5, 5))
    torch.testing.assert_close(out[1], m[1])
    expected2 = torch.zeros(5, 5)
    expected2[0, 2:5] = 1
    torch.testing.assert_close(out[2], expected2)
    d = dilate(m, 1)
    assert d[0].sum() == 4 and d[1].sum() == 16 and d[2].sum() == 4 + 8  # corner pixel -> 2x2; top-row run of 3 -> 2x4
    f = feather(m, 1.0)
    assert f[0, 0, 0] == 1 and f[1, 0, 0] < 1 and f[2, 0, 0] < 1


def test_one_by_one_image():
    one = torch.ones(1, 1, 1)
    assert remove_small_regions(one, 1).item() == 1
    assert remove_small_regions(one, 2).item() == 0
    assert keep_largest_regions(one, 1).item() == 1
    assert dilate(one, 3).item() == 1
    torch.testing.assert_close(gaussian_blur(torch.full((1, 1, 1), 0.4), 2.0), torch.full((1, 1, 1), 0.4))
    assert feather(one, 2.0).item() == 1
    binary, soft = refine_mask(torch.zeros(1, 1), torch.zeros(1, 1))
    assert binary.item() == 1 and soft.item() == 1


def test_dtype_and_device_preserved():
    p = torch.rand(2, 6, 6, dtype=torch.float64)
    a = torch.rand(2, 6, 6, dtype=torch.float64)
    assert defect_map(p, a).dtype == torch.float64
    for fn in (lambda x: binarize(x), lambda x: remove_small_regions(x, 2), lambda x: keep_largest_regions(x, 1),
               lambda x: dilate(x, 1), lambda x: gaussian_blur(x, 1.0), lambda x: feather(x, 1.0)):
        out = fn(p)
        assert out.dtype == torch.float64 and out.device == p.device
    binary, soft = refine_mask(p, a, 0.5, 2, 1, 1.5)
    assert binary.dtype == soft.dtype == torch.float64
    assert gaussian_blur(p.half(), 1.0).dtype == torch.float16


def test_refine_mask_pipeline_by_hand():
    p = torch.ones(1, 7, 7)
    a = torch.zeros(1, 7, 7)
    p[0, 0, 0] = 0.0           # isolated defect, 1 pixel: removed by min_area 2
    p[0, 3, 3] = 0.2           # defect 0.8
    a[0, 3, 4] = 0.9           # defect 0.9 -> region of 2 pixels
    a[0, 6, 6] = 0.5           # defect exactly 0.5: not above threshold
    binary, soft = refine_mask(p, a, threshold=0.5, min_area=2, dilation=1, feather_sigma=1.0)
    expected = torch.zeros(1, 7, 7)
    expected[0, 2:5, 2:6] = 1
    torch.testing.assert_close(binary, expected)
    assert torch.all(soft[binary > 0.5] == 1)
    assert math.isclose(soft[0, 3, 6].item(), math.exp(-0.5), rel_tol=1e-6)
    binary2, soft2 = refine_mask(p, a, **dataclasses.asdict(MaskSettings(0.5, 2, 1, 1.0)))
    torch.testing.assert_close(binary2, binary)
    torch.testing.assert_close(soft2, soft)


def test_refine_mask_empty_is_returned(caplog):
    with caplog.at_level("INFO"):
        binary, soft = refine_mask(torch.ones(2, 4, 4), torch.zeros(2, 4, 4), feather_sigma=2.0)
    assert binary.sum() == 0 and soft.sum() == 0
    assert "empty mask" in caplog.text


@pytest.mark.parametrize("kwargs, word", [({"min_area": -1}, "min_area"), ({"dilation": -2}, "dilation"),
                                          ({"feather_sigma": -0.5}, "feather_sigma"),
                                          ({"min_area": 2.5}, "min_area must be an int")])
def test_refine_mask_rejects_bad_settings(kwargs, word):
    with pytest.raises(ValueError, match=word):
        refine_mask(torch.zeros(1, 3, 3), torch.zeros(1, 3, 3), **kwargs)


def test_mask_settings_frozen():
    s = MaskSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.threshold = 0.2


def test_scale_to_resolution():
    assert scale_to_resolution(16, 512, 768) == 16
    assert scale_to_resolution(4.0, 1024, 2048) == 8.0
    assert scale_to_resolution(100, 256, 256, power=2) == 25.0
    with pytest.raises(ValueError, match="height must be an int >= 1"):
        scale_to_resolution(4.0, 0, 512)
