"""The refiner benchmark (benchmarks/refiner_toyworld.py) on three toy pictures with 2 steps, nothing written:
every metric is there, stage 1 keeps the pixels outside its mask, and the image metrics behave by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ci import importorskip

importorskip("diffusers")  # under CI a missing test dependency fails

from comfyui_refinery.benchmarks.toyworld import data  # noqa: E402

pytestmark = pytest.mark.needs(  # skips without them, fails under CI (they are committed)
    data.TOY_CLIP_CHECKPOINT.is_file() and (data.TOY_SD_FOLDER / "model_index.json").is_file(),
    "toy-clip or tiny-sd is not trained yet (benchmarks/toyworld/models/)",
)

from comfyui_refinery.benchmarks import refiner_toyworld as benchmark  # noqa: E402
from comfyui_refinery.benchmarks.toyworld import measures  # noqa: E402
from comfyui_refinery.core.masks import MaskSettings  # noqa: E402
from comfyui_refinery.core.refine_plan import RefinerSettings  # noqa: E402

METRICS = ("d_clip", "d_p", "d_a", "worse", "worse_rate", "worse_clip", "worse_p", "psnr_outside_median",
           "psnr_outside_ge30_rate", "no_outside", "ssim_outside")


@pytest.fixture(scope="module")
def numbers():
    from comfyui_refinery.benchmarks.toyworld.sd_pipeline import load_pipeline

    torch.set_num_threads(1)
    pictures = benchmark.toy_pictures(1, 1, defect_kinds=("noise_patch", "broken_shape"))
    pipeline = load_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return benchmark.evaluate(pictures, benchmark.load_quality_models(), pipeline, RefinerSettings(total_steps=2, mask=MaskSettings()),
                              guidance=4.0, seed=0)


def test_every_arm_has_every_metric_for_both_groups(numbers):
    for arm in benchmark.ARMS:
        for group in benchmark.GROUPS:
            for metric in METRICS:
                assert f"{arm}_{group}_{metric}" in numbers, (arm, group, metric)
        assert f"{arm}_defective_gt_mae" in numbers and f"{arm}_defective_repaired_rate" in numbers
        assert f"{arm}_clean_gt_mae" not in numbers  # clean pictures have no defect region
    for key in ("plan_defective_gated", "plan_clean_gated", "plan_defective_mask_truth_recall",
                "plan_defective_mask_latent_coverage",
                "vae_roundtrip_psnr_median", "kind_noise_patch_refiner_gt_mae"):
        assert key in numbers
    assert numbers["pictures_defective"] == 2 and numbers["pictures_clean"] == 1
    assert numbers["none_defective_worse"] == 0 and numbers["none_defective_d_p"] == 0


def test_stage1_keeps_every_pixel_outside_its_mask(numbers):
    """A plain mask (MaskSettings(): no feathering), so the feathered edge is the binary mask's edge and stage 1 leaves
    every pixel outside it as it was (PSNR at its cap, SSIM 1); the unmasked global img2img does not."""
    checked = 0
    for group in benchmark.GROUPS:
        count = numbers[f"pictures_{group}"]
        if numbers[f"refiner_stage1_{group}_no_outside"] == count:
            continue  # the mask covers every picture of this group: nothing outside to check
        checked += 1
        assert numbers[f"refiner_stage1_{group}_psnr_outside_median"] == measures.PSNR_CAP_DB
        assert numbers[f"refiner_stage1_{group}_psnr_outside_ge30_rate"] == 1.0
        assert numbers[f"refiner_stage1_{group}_ssim_outside"] == pytest.approx(1.0, abs=1e-6)
        assert numbers[f"global_{group}_psnr_outside_median"] < measures.PSNR_CAP_DB
    assert checked, "every mask covered its whole picture; pick other test pictures"


def test_psnr_and_ssim_by_hand():
    first = torch.full((2, 16, 16, 3), 0.5)
    second = first.clone()
    second[0, :, :8] += 0.1  # left half of picture 0 off by 0.1: MSE 0.01 there, PSNR 20 dB
    left = torch.zeros(2, 16, 16, dtype=torch.bool)
    left[:, :, :8] = True
    values = measures.psnr(first, second, left)
    assert values[0].item() == pytest.approx(20.0, abs=1e-4) and values[1].item() == measures.PSNR_CAP_DB
    assert math.isnan(measures.psnr(first, second, torch.zeros_like(left))[0].item())  # empty region
    ssim = measures.ssim_map(first, second)
    assert torch.allclose(ssim[1], torch.ones(16, 16), atol=1e-6) and float(ssim[0].min()) < 1.0


def test_diffusers_latent_mask_drops_thin_strokes_unless_grown_to_whole_cells():
    """diffusers' inpaint pipeline shrinks the mask by nearest sampling (pixel 0 of every 4 x 4 cell here): a
    1-px line on column 0 is kept, the same line on column 1 vanishes from the latent mask, unless the mask is first
    grown to whole latent cells (core.diffusers_refiner.latent_cover_mask, what the runner passes)."""
    from comfyui_refinery.core.diffusers_refiner import latent_cover_mask

    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, :, 0] = True
    mask[1, :, 1] = True
    kept = benchmark.latent_cells_kept_by_diffusers(mask, 4)
    assert bool(kept[0][mask[0]].all()) and not bool(kept[1][mask[1]].any())
    covered = torch.stack([latent_cover_mask(m.float(), 4) > 0.5 for m in mask])
    assert covered[1][:, :4].all() and not covered[1][:, 4:].any()  # the whole first column of cells
    assert bool(benchmark.latent_cells_kept_by_diffusers(covered, 4)[1][mask[1]].all())
