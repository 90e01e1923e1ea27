"""Does the G-Refine two-stage refiner repair toy-world defects without damaging anything else? (METHODS.md 1.4)

Pictures (64x64, held-out seeds): ``--per-kind`` toy scenes for every defect kind of ``defects.KINDS`` (one
injected defect each, so the ground-truth mask and the clean picture before injection are known) and ``--clean``
clean scenes. Quality maps: toy-clip with its learned PQ prompts and calibrated alpha (P, p) and the AQ-Map on the
scene's caption (A, a). Generator refined with: the shipped tiny Stable-Diffusion pipeline (DDIM), guidance
``--guidance`` (4, as the demo generates), picture i seeded with ``seed + i`` in every arm.

Arms
- none: the input;
- global: one diffusers img2img of the whole picture at the refiner's stage-1 strength for that picture, with the
  refiner's total steps (``scheduler_steps(total, strength)``) and seed; no gate, no mask (the naive refiner);
- refiner_stage1 / refiner: ``plan_refinement`` + ``refine_with_pipeline`` with default RefinerSettings except
  ``total_steps`` (20 as in the paper: 10 + 10), after stage 1 only / after both stages;
- references: vae_roundtrip (encode-decode with the tiny VAE only, what any pass through the latents costs) and
  truth_mask (the refiner with the ground-truth defect mask as its stage-1 mask, same p, a, strengths and gate:
  what perfect maps would give; clean pictures then get stage 2 only).
Every arm gets the same prompt per picture: the plain caption by default, since diffusers has no parser for
the ComfyUI ``(phrase:1.1)`` emphasis of eq. 7 (``--emphasized-prompts`` passes the AQ-Map's emphasized prompts).

Metrics, per arm, for defective and clean pictures separately
- d_clip: change of the toy CLIP score (cosine of toy-clip's image embedding and the caption's text embedding);
  d_p, d_a: change of the PQ score p and the AQ score a (maps recomputed on the output);
- worse: "negative optimisation" = the CLIP score OR p dropped by more than ``--clip-tolerance`` /
  ``--p-tolerance`` (fixed before the run: 0.01 and 0.02); worse_clip / worse_p count each score alone;
- gt_mae (defective only): mean |output - clean picture| inside the defect's ground-truth mask (RGB in [0, 1]),
  before = the none arm; repaired: share of pictures whose gt_mae went down by more than 0.01;
- outside the refiner's stage-1 binary mask (the whole picture when stage 1 did not run): PSNR (dB, capped at
  100) and SSIM (11-px Gaussian window, sigma 1.5; the output's pixels inside the mask are set to the input's first,
  so windows at the mask edge measure only outside changes) of output versus input; median PSNR over the pictures
  that have an outside, the share >= 30 dB and the count whose mask covers everything. Target (the issue's): PSNR
  outside the mask >= 30 dB; the RESULTS.md line judges the refiner's median, for defective and for clean pictures,
  and writes met or MISSED.
Also: how many pictures the quality gate skipped, empty masks, mask area and recall of the ground truth, the share
of mask pixels whose latent cell diffusers re-denoises (its inpaint pipeline shrinks the mask by nearest sampling),
and the PSNR of a plain VAE encode-decode (what any pass through the latent space costs; stage 2 pays it
everywhere).

Run: python benchmarks/refiner_toyworld.py [--per-kind 10] [--clean 70] [--total-steps 20] [--no-write]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, with_target  # noqa: E402

from comfyui_refinery.benchmarks.toyworld import data, defects, scenes  # noqa: E402
from comfyui_refinery.benchmarks.toyworld.measures import (  # noqa: E402
    QualityModels, Scores, load_quality_models, masked_mean, psnr, score_pictures, ssim_map, vae_roundtrip,
)
from comfyui_refinery.core.diffusers_refiner import latent_cover_mask, refine_with_pipeline, scheduler_steps  # noqa: E402
from comfyui_refinery.core.masks import MaskSettings  # noqa: E402
from comfyui_refinery.core.refine_plan import ImagePlan, RefinerSettings, plan_refinement  # noqa: E402

SEED_OFFSET = data.TEST_SEED_OFFSET + 13 * 10**6  # held out; no other toy-world set uses these seeds
PSNR_TARGET_DB = 30.0
REPAIR_MARGIN = 0.01  # gt_mae must fall by more than this (RGB in [0, 1]) to count as repaired
ARMS = ("none", "vae_roundtrip", "global", "refiner_stage1", "refiner", "truth_mask")
GROUPS = ("defective", "clean")


# ------------------------------------------------------------------------------------------------ pictures
@dataclass
class ToyPictures:
    """images: (N, H, W, 3) float in [0, 1], the pictures to refine; clean: (N, H, W, 3) the same before the
    defect was injected (equal to images for clean pictures); truth: (N, H, W) bool ground-truth defect masks
    (all False for clean pictures); captions: N scene captions; kinds: N defect kinds (None = clean)."""

    images: torch.Tensor
    clean: torch.Tensor
    truth: torch.Tensor
    captions: list[str]
    kinds: list[str | None]

    @property
    def defective(self) -> torch.Tensor:
        """(N,) bool, True for pictures with an injected defect."""
        return torch.tensor([kind is not None for kind in self.kinds])


def toy_pictures(per_kind: int, clean_count: int, defect_kinds: tuple[str, ...] = defects.KINDS,
                 seed_offset: int = SEED_OFFSET, resolution: int = 64) -> ToyPictures:
    """``per_kind`` pictures with one injected defect of each of ``defect_kinds``, then ``clean_count`` clean ones;
    picture number k is drawn from seed ``seed_offset + 1000 k``."""
    images, cleans, truths, captions, kinds = [], [], [], [], []
    order = [kind for kind in defect_kinds for _ in range(per_kind)] + [None] * clean_count
    for number, kind in enumerate(order):
        rng = np.random.default_rng(seed_offset + 1000 * number)
        scene = scenes.sample_scene(rng, resolution)
        while kind is not None and not defects.applicable(kind, scene):
            scene = scenes.sample_scene(rng, resolution)
        clean = scenes.render(scene)  # (H, W, 3) uint8
        defect = defects.INJECTORS[kind](clean, scene, rng) if kind is not None else None
        images.append(clean if defect is None else defect.image)
        cleans.append(clean)
        truths.append(np.zeros(clean.shape[:2], bool) if defect is None else defect.mask)
        captions.append(scenes.caption(scene))
        kinds.append(kind)
    return ToyPictures(
        images=torch.from_numpy(np.stack(images)).float() / 255.0,
        clean=torch.from_numpy(np.stack(cleans)).float() / 255.0,
        truth=torch.from_numpy(np.stack(truths)),
        captions=captions,
        kinds=kinds,
    )


# ------------------------------------------------------------------------------------------------ scoring
# ------------------------------------------------------------------------------------------------ image metrics
def outside_stage1_region(plans: list[ImagePlan]) -> torch.Tensor:
    """(N, H, W) bool: pixels outside the stage-1 binary mask; every pixel where stage 1 did not run."""
    return torch.stack([torch.ones_like(plan.binary_mask, dtype=torch.bool) if plan.skip_stage1
                        else plan.binary_mask <= 0.5 for plan in plans])


# ------------------------------------------------------------------------------------------------ arms
def global_img2img(pipeline, images: torch.Tensor, prompts: list[str], strengths: list[float], total_steps: int,
                   guidance: float, seed: int) -> torch.Tensor:
    """The naive refiner: img2img of each whole (H, W, 3) picture at its strength, running ``total_steps`` steps,
    picture i seeded with ``seed + i``. Returns (N, H, W, 3) in [0, 1]."""
    from diffusers import AutoPipelineForImage2Image

    img2img = AutoPipelineForImage2Image.from_pipe(pipeline)
    img2img.set_progress_bar_config(disable=True)
    outputs = []
    for index, strength in enumerate(strengths):
        output = img2img(
            prompt=prompts[index], image=images[index : index + 1].permute(0, 3, 1, 2), strength=strength,
            num_inference_steps=scheduler_steps(total_steps, strength), guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed + index), output_type="pt",
        ).images.float().cpu()  # (1, 3, H, W) in [0, 1]
        outputs.append(output[0].permute(1, 2, 0).clamp(0, 1))
    return torch.stack(outputs)


@dataclass
class ArmOutputs:
    """Every arm's (N, H, W, 3) pictures in [0, 1]; outside: per arm, the (N, H, W) bool pixels outside the stage-1
    mask that arm used (the refiner's for arms without one); plans: the refiner's plans; prompts: the N prompts."""

    pictures: dict[str, torch.Tensor]
    outside: dict[str, torch.Tensor]
    plans: list[ImagePlan]
    prompts: list[str]


def run_arms(pipeline, pictures: ToyPictures, before: Scores, settings: RefinerSettings, guidance: float, seed: int,
             emphasized_prompts: bool = False) -> ArmOutputs:
    """The arms of the module docstring, plus two references: ``vae_roundtrip`` (encode-decode only, what any
    latent-space pass costs) and ``truth_mask`` (the same refiner with the ground-truth defect mask as stage-1
    mask instead of Bi(1-P+A), same p, a, strengths and gate: what a perfect map would give)."""
    prompts = before.emphasized_prompts if emphasized_prompts else pictures.captions
    plans = plan_refinement(before.perceptual_map, before.perceptual, before.alignment_map, before.alignment,
                            prompts, settings)
    refined = refine_with_pipeline(pipeline, pictures.images, plans, guidance_scale=guidance, seed=seed,
                                   progress=False)
    naive = global_img2img(pipeline, pictures.images, prompts, [plan.stage1_strength for plan in plans],
                           settings.total_steps, guidance, seed)
    truth_plans = plan_refinement(1.0 - pictures.truth.float(), before.perceptual, torch.zeros(pictures.truth.shape),
                                  before.alignment, prompts, settings)
    oracle = refine_with_pipeline(pipeline, pictures.images, truth_plans, guidance_scale=guidance, seed=seed,
                                  progress=False)
    outside = outside_stage1_region(plans)
    return ArmOutputs(
        pictures={"none": pictures.images, "vae_roundtrip": vae_roundtrip(pipeline, pictures.images), "global": naive,
                  "refiner_stage1": refined.after_stage1, "refiner": refined.images, "truth_mask": oracle.images},
        outside={**{arm: outside for arm in ARMS}, "truth_mask": outside_stage1_region(truth_plans)},
        plans=plans, prompts=prompts,
    )


# ------------------------------------------------------------------------------------------------ metrics
def arm_metrics(pictures: ToyPictures, before: Scores, after: Scores, outputs: torch.Tensor, outside: torch.Tensor,
                group: torch.Tensor, clip_tolerance: float, p_tolerance: float) -> dict[str, float]:
    """Metrics of one arm over the pictures selected by the (N,) bool ``group`` (see the module docstring)."""
    d_clip = (after.clip - before.clip)[group]
    d_p = (after.perceptual - before.perceptual)[group]
    worse_clip, worse_p = d_clip < -clip_tolerance, d_p < -p_tolerance
    psnr_outside = psnr(outputs, pictures.images, outside)[group]
    psnr_outside = psnr_outside[~psnr_outside.isnan()]  # pictures whose mask covers everything have no outside
    kept_inside = torch.where(outside[..., None], outputs, pictures.images)  # SSIM windows see no change inside
    ssim_outside = masked_mean(ssim_map(kept_inside, pictures.images), outside)[group]
    metrics = {
        "d_clip": float(d_clip.mean()),
        "d_p": float(d_p.mean()),
        "d_a": float((after.alignment - before.alignment)[group].mean()),
        "worse": float((worse_clip | worse_p).sum()),
        "worse_rate": float((worse_clip | worse_p).float().mean()),
        "worse_clip": float(worse_clip.sum()),
        "worse_p": float(worse_p.sum()),
        "psnr_outside_median": float(psnr_outside.median()) if len(psnr_outside) else float("nan"),
        "psnr_outside_ge30_rate": float((psnr_outside >= PSNR_TARGET_DB).float().mean()),
        "no_outside": float(int(group.sum()) - len(psnr_outside)),
        "ssim_outside": float(ssim_outside.nanmean()),
    }
    has_truth = group & pictures.truth.flatten(1).any(dim=1)
    if bool(has_truth.any()):
        error_before = masked_mean((pictures.images - pictures.clean).abs(), pictures.truth)[has_truth]
        error_after = masked_mean((outputs - pictures.clean).abs(), pictures.truth)[has_truth]
        metrics["gt_mae"] = float(error_after.mean())
        metrics["repaired_rate"] = float((error_after < error_before - REPAIR_MARGIN).float().mean())
    return metrics


def latent_cells_kept_by_diffusers(binary: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """Which pixels of (N, H, W) bool masks lie in a latent cell that diffusers' inpaint pipeline re-denoises: it
    shrinks the mask to the latent grid with ``F.interpolate`` (nearest, one pixel per cell). Returns (N, H, W)
    bool."""
    height, width = binary.shape[1:]
    cells = F.interpolate(binary[:, None].float(), size=(height // vae_scale_factor, width // vae_scale_factor))
    return F.interpolate(cells, size=(height, width))[:, 0] > 0.5  # back to pixels, nearest


def plan_statistics(plans: list[ImagePlan], pictures: ToyPictures, group: torch.Tensor,
                    vae_scale_factor: int) -> dict[str, float]:
    """Gate and mask statistics of the refiner's plans over the (N,) bool ``group``; mask_latent_coverage: share
    of the stage-1 mask pixels whose latent cell diffusers actually re-denoises."""
    chosen = [plan for plan, keep in zip(plans, group.tolist()) if keep]
    stage1 = [plan for plan in chosen if not plan.skip_stage1]
    truth = pictures.truth[group]
    binary = torch.stack([plan.binary_mask > 0.5 for plan in chosen])
    truth_pixels = truth.sum().clamp(min=1)
    stage1_binary = torch.stack([plan.binary_mask > 0.5 for plan in stage1]) if stage1 else None
    # what refine_with_pipeline passes diffusers: the mask grown to whole latent cells (latent_cover_mask)
    passed = None if stage1_binary is None else torch.stack(
        [latent_cover_mask(mask.float(), vae_scale_factor) > 0.5 for mask in stage1_binary])
    coverage = float("nan") if stage1_binary is None or not bool(stage1_binary.any()) else float(
        (latent_cells_kept_by_diffusers(passed, vae_scale_factor) & stage1_binary).sum() / stage1_binary.sum())
    return {
        "mask_latent_coverage": coverage,
        "gated": float(sum(plan.reason == "passed the quality gate" for plan in chosen)),
        "empty_mask": float(sum(plan.reason == "empty mask" for plan in chosen)),
        "stage1_run": float(len(stage1)),
        "mask_area": float(binary.float().mean()),
        "mask_truth_recall": float((binary & truth).sum() / truth_pixels) if bool(truth.any()) else float("nan"),
        "stage1_strength": float(np.mean([plan.stage1_strength for plan in stage1])) if stage1 else float("nan"),
    }


def evaluate(pictures: ToyPictures, models: QualityModels, pipeline, settings: RefinerSettings, guidance: float,
             seed: int, clip_tolerance: float = 0.01, p_tolerance: float = 0.02,
             emphasized_prompts: bool = False) -> dict[str, float]:
    """Run every arm on ``pictures`` and return a flat dict of named numbers ``<arm>_<group>_<metric>``,
    ``plan_<group>_<statistic>``, ``kind_<kind>_<arm>_gt_mae`` and reference numbers."""
    before = score_pictures(models, pictures.images, pictures.captions)
    arms = run_arms(pipeline, pictures, before, settings, guidance, seed, emphasized_prompts)
    groups = {"defective": pictures.defective, "clean": ~pictures.defective}
    numbers: dict[str, float] = {}
    for arm, outputs in arms.pictures.items():
        after = before if arm == "none" else score_pictures(models, outputs, pictures.captions)
        for name, group in groups.items():
            if not bool(group.any()):
                continue
            for key, value in arm_metrics(pictures, before, after, outputs, arms.outside[arm], group,
                                          clip_tolerance, p_tolerance).items():
                numbers[f"{arm}_{name}_{key}"] = value
        for kind in defects.KINDS:
            of_kind = torch.tensor([k == kind for k in pictures.kinds])
            if bool(of_kind.any()):
                error = masked_mean((outputs - pictures.clean).abs(), pictures.truth)[of_kind]
                numbers[f"kind_{kind}_{arm}_gt_mae"] = float(error.mean())
    for name, group in groups.items():
        if bool(group.any()):
            statistics = plan_statistics(arms.plans, pictures, group, pipeline.vae_scale_factor)
            numbers.update({f"plan_{name}_{key}": value for key, value in statistics.items()})
            numbers[f"before_{name}_p"] = float(before.perceptual[group].mean())
            numbers[f"before_{name}_a"] = float(before.alignment[group].mean())
            numbers[f"before_{name}_clip"] = float(before.clip[group].mean())
    whole = torch.ones(pictures.truth.shape, dtype=torch.bool)
    numbers["vae_roundtrip_psnr_median"] = float(psnr(arms.pictures["vae_roundtrip"], pictures.images, whole).median())
    numbers.update({"pictures_defective": float(pictures.defective.sum()),
                    "pictures_clean": float((~pictures.defective).sum()), "total_steps": float(settings.total_steps),
                    "guidance": guidance, "clip_tolerance": clip_tolerance, "p_tolerance": p_tolerance,
                    "emphasized_prompts": float(emphasized_prompts)})
    return numbers


# ------------------------------------------------------------------------------------------------ report
def _cell(numbers: dict[str, float], key: str, digits: int = 3) -> str:
    value = numbers.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_table(numbers: dict[str, float]) -> str:
    """Readable tables: one per group (arms as rows), the plans' statistics and the ground-truth error per kind."""
    lines = []
    for group in GROUPS:
        count = int(numbers.get(f"pictures_{group}", 0))
        if not count:
            continue
        before = f"before_{group}_"
        lines.append(f"{group} pictures ({count}); before: p {_cell(numbers, before + 'p')}, a "
                     f"{_cell(numbers, before + 'a')}, toy CLIP score {_cell(numbers, before + 'clip')}")
        lines.append(f"  {'arm':15s} {'d_clip':>7s} {'d_p':>7s} {'d_a':>7s} {'worse':>9s} {'clip/p':>7s} "
                     f"{'gt_mae':>7s} {'repaired':>8s} {'PSNRout':>7s} {'>=30dB':>6s} {'no_out':>6s} {'SSIMout':>7s}")
        for arm in ARMS:
            prefix = f"{arm}_{group}_"
            worse = f"{int(numbers[prefix + 'worse'])} ({numbers[prefix + 'worse_rate']:.0%})"
            worse_each = f"{int(numbers[prefix + 'worse_clip'])}/{int(numbers[prefix + 'worse_p'])}"
            lines.append(
                f"  {arm:15s} {_cell(numbers, prefix + 'd_clip'):>7s} {_cell(numbers, prefix + 'd_p'):>7s} "
                f"{_cell(numbers, prefix + 'd_a'):>7s} {worse:>9s} {worse_each:>7s} "
                f"{_cell(numbers, prefix + 'gt_mae'):>7s} {_cell(numbers, prefix + 'repaired_rate', 2):>8s} "
                f"{_cell(numbers, prefix + 'psnr_outside_median', 1):>7s} "
                f"{_cell(numbers, prefix + 'psnr_outside_ge30_rate', 2):>6s} {int(numbers[prefix + 'no_outside']):>6d} "
                f"{_cell(numbers, prefix + 'ssim_outside'):>7s}")
        plan = f"plan_{group}_"
        lines.append(f"  refiner plans: gated (untouched) {int(numbers[plan + 'gated'])}, empty mask "
                     f"{int(numbers[plan + 'empty_mask'])}, stage 1 ran {int(numbers[plan + 'stage1_run'])}, mask area "
                     f"{_cell(numbers, plan + 'mask_area')}, ground truth inside the mask "
                     f"{_cell(numbers, plan + 'mask_truth_recall')}, stage-1 strength "
                     f"{_cell(numbers, plan + 'stage1_strength')}, mask pixels in latent cells diffusers re-denoises "
                     f"{_cell(numbers, plan + 'mask_latent_coverage')}")
        lines.append("")
    lines.append("ground-truth error (mean |x - clean| inside the defect mask) per kind:")
    lines.append(f"  {'kind':15s} " + " ".join(f"{arm:>14s}" for arm in ARMS))
    for kind in defects.KINDS:
        if f"kind_{kind}_none_gt_mae" in numbers:
            lines.append(f"  {kind:15s} " + " ".join(f"{_cell(numbers, f'kind_{kind}_{arm}_gt_mae'):>14s}"
                                                     for arm in ARMS))
    lines.append(f"VAE encode-decode alone: median PSNR {numbers['vae_roundtrip_psnr_median']:.1f} dB (whole picture)")
    return "\n".join(lines)


def summary_line(numbers: dict[str, float], threads: int, seconds: float) -> str:
    """The RESULTS.md line: the main numbers of every arm, as defective/clean."""
    def one(key: str, spec: str) -> str:
        return _format(numbers.get(key), spec)

    def both(prefix: str, key: str, spec: str) -> str:
        return "/".join(one(f"{prefix}_{group}_{key}", spec) for group in GROUPS)

    def arm(name: str) -> str:
        return (f"gt_mae {one(f'{name}_defective_gt_mae', '.3f')}, d_clip {both(name, 'd_clip', '+.3f')}, "
                f"d_p {both(name, 'd_p', '+.3f')}, worse {both(name, 'worse', '.0f')}, PSNR outside "
                f"{both(name, 'psnr_outside_median', '.1f')} dB, SSIM outside {both(name, 'ssim_outside', '.3f')}")

    def psnr_target(group: str) -> str:
        return with_target(numbers.get(f"refiner_{group}_psnr_outside_median", math.nan), ">=", PSNR_TARGET_DB, ".1f")

    return (
        f"G-Refine on the toy world (toy-clip maps, tiny-sd, {one('total_steps', '.0f')} steps, guidance "
        f"{one('guidance', 'g')}, {one('pictures_defective', '.0f')} defective / {one('pictures_clean', '.0f')} clean "
        f"64 px pictures; x/y = defective/clean): input gt_mae {one('none_defective_gt_mae', '.3f')}; global img2img "
        f"at stage-1 strength: {arm('global')}; refiner: {arm('refiner')}; refiner's median PSNR outside its mask, "
        f"defective {psnr_target('defective')}, clean {psnr_target('clean')} (share of pictures >= "
        f"{PSNR_TARGET_DB:g} dB {both('refiner', 'psnr_outside_ge30_rate', '.2f')}); refiner after stage 1 only: "
        f"{arm('refiner_stage1')}; ground-truth mask instead of Bi(1-P+A): {arm('truth_mask')}; refiner mask area "
        f"{both('plan', 'mask_area', '.2f')}, ground truth inside it {one('plan_defective_mask_truth_recall', '.2f')}; "
        f"gate skipped {both('plan', 'gated', '.0f')}, empty masks {both('plan', 'empty_mask', '.0f')}; tiny-VAE "
        f"encode-decode alone: {one('vae_roundtrip_psnr_median', '.1f')} dB, d_p {both('vae_roundtrip', 'd_p', '+.3f')}; "
        f"worse = toy CLIP score down > {one('clip_tolerance', 'g')} or p down > {one('p_tolerance', 'g')}; "
        f"{threads} thread, {seconds:.0f} s"
    )


def _format(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=10, help="defective pictures per defect kind (7 kinds)")
    parser.add_argument("--clean", type=int, default=70, help="clean pictures")
    parser.add_argument("--total-steps", type=int, default=20, help="steps of both stages (n1 + n2); global arm too")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance of every arm")
    parser.add_argument("--seed", type=int, default=0, help="picture i is sampled with seed + i")
    parser.add_argument("--clip-tolerance", type=float, default=0.01, help="CLIP-score drop that counts as worse")
    parser.add_argument("--p-tolerance", type=float, default=0.02, help="p drop that counts as worse")
    parser.add_argument("--min-area", type=int, default=0, help="mask knob (RefinerSettings default 0)")
    parser.add_argument("--dilation", type=int, default=0, help="mask knob (RefinerSettings default 0)")
    parser.add_argument("--feather", type=float, default=0.0, help="mask knob (RefinerSettings default 0)")
    parser.add_argument("--emphasized-prompts", action="store_true",
                        help="prompt with the AQ-Map's emphasized prompts (literal '(phrase:1.1)' text in diffusers)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-write", action="store_true", help="print only (for trying other settings)")
    args = parser.parse_args(argv)
    if args.per_kind < 0 or args.clean < 0 or args.per_kind + args.clean == 0:
        parser.error("--per-kind and --clean must be >= 0 and not both 0")
    return args


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from comfyui_refinery.benchmarks.toyworld.sd_pipeline import load_pipeline

    start = time.time()
    settings = RefinerSettings(total_steps=args.total_steps, mask=MaskSettings(
        min_area=args.min_area, dilation=args.dilation, feather_sigma=args.feather))
    pipeline = load_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    numbers = evaluate(toy_pictures(args.per_kind, args.clean), load_quality_models(), pipeline, settings,
                       args.guidance, args.seed, args.clip_tolerance, args.p_tolerance, args.emphasized_prompts)
    numbers["threads"] = float(args.threads)
    seconds = time.time() - start
    numbers["seconds"] = seconds
    print(format_table(numbers))
    summary = summary_line(numbers, args.threads, seconds)
    return report("refiner_toyworld", numbers, summary, argv, write=not args.no_write)


if __name__ == "__main__":
    main()
