"""Is the toy world good enough to judge methods? The shipped toy models against the floors of the "Toy world v2"
issue, on held-out scenes and captions (never used in training).

Keys written to ``benchmarks/results/toyworld_models.json`` (targets in TARGETS, ``target_met`` = all met):
- ``vae_psnr_db``: mean PSNR (dB) of the VAE's encode-decode (latent mean) over 500 scenes of every background,
  half of them with 1-2 injected defects of any kind; ``vae_d_p`` / ``vae_d_clip``: the mean change of p (PQ score)
  and of the toy CLIP score (cosine with the caption) that the round trip alone causes;
- ``colour_right`` / ``shape_right`` / ``size_right``: 200 held-out single-object captions (any background), the
  picture's largest object (``judge.main_object``) has the caption's colour / shape / size; ``count_right``: 200
  held-out one-group captions with counts 1-3, the judge finds exactly that many objects of the group's colour;
  ``two_group_right``: 200 held-out two-group captions, both groups drawn with the right colour and shape;
  every picture from ``--steps`` DDIM steps (20) at guidance ``--guidance`` (5), seeded per picture;
- ``judge_on_renders``: share of 500 clean rendered scenes on which the judge finds every attribute right;
- ``pq_image_auroc``: AUROC of p separating clean from defective pictures (400 held-out pictures, 0-2 perceptual
  defects each); ``pq_pixel_auroc``: AUROC of 1 - P against the ground-truth defect masks, over all pixels of the
  defective pictures;
- ``aq_right_flag``: share of held-out pictures with a missing object, a wrong colour or a wrong count whose
  affected phrase the AQ-Map flags with the right defect type; ``aq_false_flag_correct``: share of correct
  pictures with any flag (a_bound calibrated on correct training pictures, as pq_aq_toyworld.py);
- ``reward_judge_agreement``: ``--agreement-captions`` held-out captions x 4 tiny-sd pictures each (the Syn-Pic
  setting of rankdpo_toyworld.py); for every pair of pictures of one caption that the judge separates, whether the
  Syn-Pic win rates of the training rewards (toy-clip CLIPScore and the alignment score a) order them the same way
  (a tie counts half).

``--sd-folder`` / ``--clip`` / ``--prompts`` measure other models (candidates before they ship);
``--unet-snapshot`` swaps in an EMA snapshot of ``train_tiny_sd --stage unet`` (the learning curve);
``--only`` limits the run to some groups of keys.

Run: python benchmarks/toyworld_models.py [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import limit_threads, report  # noqa: E402

from comfyui_refinery.benchmarks.toyworld import data, defects, judge, scenes  # noqa: E402
from comfyui_refinery.benchmarks.toyworld.measures import (  # noqa: E402
    auroc, calibrated_a_bound, evaluate_aq, load_quality_models, psnr, score_pictures, vae_roundtrip,
)
from comfyui_refinery.core.reward_aggregation import syn_pic_win_rates  # noqa: E402

TARGETS = {  # key: (direction, floor or ceiling)
    "vae_psnr_db": (">=", 32.0),
    "vae_d_p": (">=", -0.03),
    "vae_d_clip": (">=", -0.01),
    "colour_right": (">=", 0.85),
    "shape_right": (">=", 0.75),
    "size_right": (">=", 0.80),
    "count_right": (">=", 0.60),
    "two_group_right": (">=", 0.50),
    "judge_on_renders": (">=", 0.98),
    "pq_image_auroc": (">=", 0.90),
    "pq_pixel_auroc": (">=", 0.85),
    "aq_right_flag": (">=", 0.75),
    "aq_false_flag_correct": ("<=", 0.10),
    "reward_judge_agreement": (">=", 0.75),
}
GROUPS = ("vae", "generation", "judge", "pq", "aq", "agreement")
SEED_OFFSET = data.TEST_SEED_OFFSET + 21 * 10**6  # held out; no other toy-world set uses these seeds


def target_met(key: str, value: float) -> bool:
    direction, bound = TARGETS[key]
    return value >= bound if direction == ">=" else value <= bound


def to_unit(pictures: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) pictures -> (N, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.stack(pictures)).float() / 255.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, H, W, 3) float in [0, 1] -> uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


# ------------------------------------------------------------------------------------------------ models
def load_pipeline(folder: Path, unet_snapshot: Path | None):
    from comfyui_refinery.benchmarks.toyworld.sd_pipeline import load_pipeline as load_toy_pipeline

    pipeline = load_toy_pipeline(folder)
    if unet_snapshot is not None:
        from diffusers import UNet2DConditionModel

        pipeline.unet = UNet2DConditionModel.from_pretrained(str(unet_snapshot)).eval()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline, captions: list[str], steps: int, guidance: float, seed: int, batch_size: int = 50):
    """(N, H, W, 3) float pictures in [0, 1], picture i drawn from noise seeded ``seed + i``."""
    outputs = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipeline(chunk, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                          generator=generators, output_type="np").images
        outputs.append(torch.from_numpy(images).float())
    return torch.cat(outputs)


# ------------------------------------------------------------------------------------------------ measurements
def vae_scenes(count: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` held-out pictures of every background, the second half with 1-2 injected defects of any kind."""
    pictures, captions = [], []
    seed = SEED_OFFSET
    while len(pictures) < count:
        seed += 1
        if len(pictures) < count // 2:
            image, caption, _ = scenes.generate(seed)
        else:
            image, caption, masks, _ = defects.make_example(seed)
            if not masks:
                continue
        pictures.append(image)
        captions.append(caption)
    return to_unit(pictures), captions


def measure_vae(pipeline, quality, count: int) -> dict[str, float]:
    images, captions = vae_scenes(count)
    round_trip = torch.cat([vae_roundtrip(pipeline, images[i : i + 100]) for i in range(0, count, 100)])
    before, after = score_pictures(quality, images, captions), score_pictures(quality, round_trip, captions)
    everywhere = torch.ones(images.shape[:3], dtype=torch.bool)
    return {
        "vae_psnr_db": float(psnr(images, round_trip, everywhere).mean()),
        "vae_d_p": float((after.perceptual - before.perceptual).mean()),
        "vae_d_clip": float((after.clip - before.clip).mean()),
        "vae_pictures": float(count),
    }


def measure_generation(pipeline, count: int, steps: int, guidance: float) -> dict[str, float]:
    single = scenes.held_out_scenes(count, SEED_OFFSET + 1, keep=lambda s: len(s.objects) == 1
                                    and s.objects[0].count == 1)
    counted = scenes.held_out_scenes(count, SEED_OFFSET + 2, keep=lambda s: len(s.objects) == 1)
    paired = scenes.held_out_scenes(count, SEED_OFFSET + 3, keep=lambda s: len(s.objects) == 2)
    numbers = {}
    pictures = to_uint8(generate(pipeline, [scenes.caption(s) for s in single], steps, guidance, seed=0))
    found = [judge.main_object(picture) for picture in pictures]
    for attribute in ("colour", "shape", "size"):
        numbers[f"{attribute}_right"] = float(np.mean([
            component is not None and getattr(component, attribute) == getattr(scene.objects[0], attribute)
            for component, scene in zip(found, single)]))
    captions = [scenes.caption(s) for s in counted]
    pictures = to_uint8(generate(pipeline, captions, steps, guidance, seed=10**5))
    numbers["count_right"] = float(np.mean([judge.judge(p, c).groups[0].count_right
                                            for p, c in zip(pictures, captions)]))
    captions = [scenes.caption(s) for s in paired]
    pictures = to_uint8(generate(pipeline, captions, steps, guidance, seed=2 * 10**5))
    verdicts = [judge.judge(p, c) for p, c in zip(pictures, captions)]
    numbers["two_group_right"] = float(np.mean([all(g.colour_right and g.shape_right for g in v.groups)
                                                for v in verdicts]))
    numbers["two_group_all_right"] = float(np.mean([v.all_right for v in verdicts]))
    numbers["generation_captions"] = float(count)
    return numbers


def measure_judge_on_renders(count: int) -> dict[str, float]:
    right = [judge.judge(*scenes.generate(SEED_OFFSET + 5 * 10**5 + i)[:2]).all_right for i in range(count)]
    return {"judge_on_renders": float(np.mean(right))}


def measure_pq(quality, count: int) -> dict[str, float]:
    pictures = data.perceptual_set(count, SEED_OFFSET + 10**6)
    scores = score_pictures(quality, pictures.images, [""] * count)
    clean = pictures.labels[:, 0].bool().numpy()
    defective = ~clean
    defect_scores = (1 - scores.perceptual_map)[torch.from_numpy(defective)]
    return {
        "pq_image_auroc": auroc(scores.perceptual.numpy(), clean),
        "pq_pixel_auroc": auroc(defect_scores.flatten().numpy(), pictures.masks[torch.from_numpy(defective)]
                                .flatten().numpy()),
        "pq_pictures": float(count),
    }


def measure_aq(quality, count: int) -> dict[str, float]:
    cases = data.alignment_cases(count, SEED_OFFSET + 2 * 10**6)
    row = evaluate_aq(quality.encoder, cases, calibrated_a_bound(quality.encoder))
    return {"aq_right_flag": row["right_flag_rate"], "aq_false_flag_correct": row["false_flag_rate_pictures"],
            "aq_pointing": row["pointing"]}


def measure_agreement(pipeline, quality, count: int, steps: int, guidance: float, k: int = 4) -> dict[str, float]:
    from comfyui_refinery.benchmarks.toyworld.rewards import ToyAlignmentReward, toy_clip_score

    captions = [scenes.caption(s) for s in scenes.held_out_scenes(count, SEED_OFFSET + 4)]
    repeated = [caption for caption in captions for _ in range(k)]
    images = generate(pipeline, repeated, steps, guidance, seed=3 * 10**5)
    rewards = [toy_clip_score(), ToyAlignmentReward()]
    scores = torch.stack([torch.cat([reward.score(images[i : i + 64], repeated[i : i + 64])
                                     for i in range(0, len(repeated), 64)]) for reward in rewards])  # (n, P*k)
    win_rates = syn_pic_win_rates(scores.view(len(rewards), count, k).permute(1, 0, 2))  # (P, k)
    verdicts = np.array([judge.judge(p, c).score for p, c in zip(to_uint8(images), repeated)]).reshape(count, k)
    agree, pairs = 0.0, 0
    for prompt in range(count):
        for i in range(k):
            for j in range(i + 1, k):
                judged = np.sign(verdicts[prompt, i] - verdicts[prompt, j])
                if judged == 0:
                    continue
                rewarded = np.sign(float(win_rates[prompt, i] - win_rates[prompt, j]))
                agree += 1.0 if rewarded == judged else (0.5 if rewarded == 0 else 0.0)
                pairs += 1
    return {"reward_judge_agreement": agree / max(1, pairs), "agreement_pairs": float(pairs),
            "agreement_judge_mean": float(verdicts.mean())}


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd-folder", type=Path, default=data.TOY_SD_FOLDER)
    parser.add_argument("--unet-snapshot", type=Path, default=None)
    parser.add_argument("--clip", type=Path, default=data.TOY_CLIP_CHECKPOINT)
    parser.add_argument("--prompts", type=Path, default=data.TOY_PROMPTS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--vae-pictures", type=int, default=500)
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--renders", type=int, default=500)
    parser.add_argument("--pq-pictures", type=int, default=400)
    parser.add_argument("--aq-pictures", type=int, default=400)
    parser.add_argument("--agreement-captions", type=int, default=96)
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS))
    parser.add_argument("--no-write", action="store_true", help="print only (candidates, learning curves)")
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    cores = limit_threads()
    start = time.time()
    quality = load_quality_models(args.clip, args.prompts)
    needs_pipeline = {"vae", "generation", "agreement"} & set(args.only)
    pipeline = load_pipeline(args.sd_folder, args.unet_snapshot) if needs_pipeline else None
    numbers: dict[str, float] = {}
    if "vae" in args.only:
        numbers.update(measure_vae(pipeline, quality, args.vae_pictures))
    if "generation" in args.only:
        numbers.update(measure_generation(pipeline, args.captions, args.steps, args.guidance))
    if "judge" in args.only:
        numbers.update(measure_judge_on_renders(args.renders))
    if "pq" in args.only:
        numbers.update(measure_pq(quality, args.pq_pictures))
    if "aq" in args.only:
        numbers.update(measure_aq(quality, args.aq_pictures))
    if "agreement" in args.only:
        numbers.update(measure_agreement(pipeline, quality, args.agreement_captions, args.steps, args.guidance))
    met = {key: target_met(key, value) for key, value in numbers.items() if key in TARGETS}
    numbers.update({f"met_{key}": float(value) for key, value in met.items()})
    numbers.update({"target_met": float(len(met) == len(TARGETS) and all(met.values())),
                    "targets_met": float(sum(met.values())), "targets_measured": float(len(met)),
                    "steps": float(args.steps), "guidance": float(args.guidance),
                    "seconds": time.time() - start, "threads": float(cores)})
    lines = [f"{key:24s} {numbers[key]:8.4f}  target {TARGETS[key][0]} {TARGETS[key][1]}  "
             f"{'met' if met[key] else 'MISSED'}" for key in TARGETS if key in numbers]
    print("\n".join(lines))
    summary = "; ".join(f"{key} {numbers[key]:.3f} ({'met' if met[key] else 'missed'})"
                        for key in TARGETS if key in numbers)
    summary += f"; {int(numbers['targets_met'])} of {len(TARGETS)} targets met"
    return report("toyworld_models", numbers, summary, argv, write=not args.no_write)


if __name__ == "__main__":
    main()
