"""Focus-N-Fix vs DRaFT-K (beta 0) on the toy world (issue target: PSNR outside the problem regions >= 1.5x DRaFT's
at a reward gain within 20 % of DRaFT's; paper, SDXL: 20.92 vs 12.40 dB).

Reward: ``RedContentReward`` (benchmarks/toyworld/rewards.py), which penalises one localisable defect, red pixels
(the toy counterpart of the paper's content classifiers), at width 0.15 (``--red-width``; the first runs used 0.25,
which also scored faint red tints of the backgrounds, so a third of the reward lay outside the problem regions); its
gradient saliency, smoothed and thresholded by ``core/focus_n_fix.region_mask``, is the region function M (paper
sec. 4.1). Training prompts: single-object captions with a red object (the prompts the reward concerns). Both
methods: ``refinery-train-focus-n-fix``'s code in-process, the same LoRA (rank 8), steps, batch, learning rate,
sampling (DDIM, guidance 4, K = 2) and seeds; only beta differs.

Evaluation, every picture from the same initial noise for the base model and each LoRA: on held-out red captions
the reward gain (mean r fine-tuned - mean r base), and PSNR / SSIM between base and fine-tuned pictures outside the
problem regions (M of the base picture); on held-out captions of other colours (which the reward does not concern)
PSNR / SSIM over the whole picture. ratio = Focus-N-Fix's PSNR outside the regions / DRaFT's.

Run: python benchmarks/focus_n_fix_toyworld.py [--steps 300] [--beta 0.15] [--seeds 0 1 2] [--red-width 0.15]
[--threads 2] [--ship-loras] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import limit_threads, report, with_target  # noqa: E402
from comfyui_refinery.benchmarks.toyworld.measures import masked_mean, psnr, ssim_map  # noqa: E402

from comfyui_refinery.benchmarks.toyworld import data, rewards  # noqa: E402
from comfyui_refinery.core import focus_n_fix  # noqa: E402
from comfyui_refinery.trainers.focus_n_fix import train as trainer  # noqa: E402

TRAIN_CAPTION_SEED = 111
HELD_OUT_CAPTION_SEED = 222
EVAL_NOISE_SEED = 333
OTHER_COLOURS = ("green", "blue", "yellow", "white", "purple")
METHODS = {"focus-n-fix": None, "draft": 0.0}  # beta: None = --beta
SHIPPED_LORAS = data.MODELS_DIR / "loras"


def load_pipeline():
    from comfyui_refinery.trainers.common.model_loading import load_sd_pipeline
    from diffusers import DDIMScheduler

    pipeline = load_sd_pipeline(data.TOY_SD_FOLDER)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)  # the trainer's sampler
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def generate(pipeline, captions: list[str], steps: int, guidance: float) -> torch.Tensor:
    """(N, 64, 64, 3) in [0, 1]; caption i from generator seed EVAL_NOISE_SEED + i."""
    generators = [torch.Generator().manual_seed(EVAL_NOISE_SEED + index) for index in range(len(captions))]
    images = pipeline(captions, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                      generator=generators, output_type="pt").images
    return images.permute(0, 2, 3, 1).float().clamp(0, 1)


def problem_regions(reward, pictures: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """M of each base picture (the trainer's region function: saliency + RegionSettings defaults): (N, H, W) bool."""
    heatmap = focus_n_fix.saliency_heatmap(trainer.reward_function(reward), pictures, captions)
    mask, _ = focus_n_fix.region_mask(heatmap)
    return mask.bool()


def train_one(prompts: Path, output: Path, beta: float, seed: int, args: argparse.Namespace, reward) -> Path:
    config = trainer.parse_args([
        "--prompts", str(prompts), "--model", str(data.TOY_SD_FOLDER), "--reward", str(data.TOY_CLIP_CHECKPOINT),
        "--output-dir", str(output), "--beta", str(beta), "--seed", str(seed), "--max-train-steps", str(args.steps),
        "--train-batch-size", str(args.batch_size), "--learning-rate", str(args.learning_rate),
        "--sampling-steps", str(args.sampling_steps), "--truncate-k", str(args.truncate_k),
        "--guidance-scale", str(args.guidance), "--rank", "8", "--checkpointing-steps", str(args.steps + 1),
        "--mask-samples", "4", "--log-every", str(max(1, args.steps // 5)), "--threads", str(args.threads),
        "--no-gradient-checkpointing"])
    return trainer.train(config, reward=reward)  # --reward is unused: the toy reward object is passed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-prompts", type=int, default=48)
    parser.add_argument("--eval-prompts", type=int, default=48, help="held-out captions of each group")
    parser.add_argument("--sampling-steps", type=int, default=10)
    parser.add_argument("--truncate-k", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.15, help="Focus-N-Fix's beta (DRaFT: 0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--red-width", type=float, default=0.15, help="RedContentReward's width (RGB distance; "
                        "0.25 was the first setting, see its docstring)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--ship-loras", action="store_true",
                        help="copy the first seed's LoRAs to benchmarks/toyworld/models/loras/<method>.safetensors")
    parser.add_argument("--no-write", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    args.threads = limit_threads(args.threads)
    started = time.perf_counter()
    reward = rewards.RedContentReward(width=args.red_width)
    train_captions = rewards.single_object_captions(args.train_prompts, TRAIN_CAPTION_SEED, colours=("red",))
    red_captions = rewards.single_object_captions(args.eval_prompts, HELD_OUT_CAPTION_SEED, colours=("red",))
    other_captions = rewards.single_object_captions(args.eval_prompts, HELD_OUT_CAPTION_SEED, colours=OTHER_COLOURS)
    pipeline = load_pipeline()
    base_red = generate(pipeline, red_captions, args.sampling_steps, args.guidance)
    base_other = generate(pipeline, other_captions, args.sampling_steps, args.guidance)
    regions = problem_regions(reward, base_red, red_captions)
    outside = ~regions
    base_reward = reward.score(base_red, red_captions)
    results: dict[str, dict[str, list[float]]] = {method: {} for method in METHODS}
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        prompts = work / "prompts.txt"
        prompts.write_text("\n".join(train_captions) + "\n")
        for seed in args.seeds:
            for method, beta in METHODS.items():
                beta = args.beta if beta is None else beta
                run_started = time.perf_counter()
                lora = train_one(prompts, work / f"{method}-seed{seed}", beta, seed, args, reward)
                seconds = time.perf_counter() - run_started
                if args.ship_loras and seed == args.seeds[0]:
                    SHIPPED_LORAS.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(lora, SHIPPED_LORAS / f".{method}.safetensors.tmp")
                    os.replace(SHIPPED_LORAS / f".{method}.safetensors.tmp", SHIPPED_LORAS / f"{method}.safetensors")
                pipeline.load_lora_weights(str(lora), adapter_name=f"{method.replace('-', '_')}{seed}")
                tuned_red = generate(pipeline, red_captions, args.sampling_steps, args.guidance)
                tuned_other = generate(pipeline, other_captions, args.sampling_steps, args.guidance)
                pipeline.unload_lora_weights()
                whole = torch.ones(outside.shape, dtype=torch.bool)
                psnr_outside = psnr(tuned_red, base_red, outside)
                row = {
                    "reward_gain": float(reward.score(tuned_red, red_captions).mean() - base_reward.mean()),
                    "psnr_outside": float(psnr_outside.nanmean()),
                    "ssim_outside": float(masked_mean(ssim_map(tuned_red, base_red), outside).nanmean()),
                    "psnr_inside": float(psnr(tuned_red, base_red, regions).nanmean()),
                    "psnr_unconcerned": float(psnr(tuned_other, base_other, whole).mean()),
                    "ssim_unconcerned": float(ssim_map(tuned_other, base_other).mean()),
                    "reward_unconcerned_change": float(reward.score(tuned_other, other_captions).mean()
                                                       - reward.score(base_other, other_captions).mean()),
                    "train_seconds": seconds,
                }
                for key, value in row.items():
                    results[method].setdefault(key, []).append(value)
                print(method, seed, {key: round(value, 3) for key, value in row.items()}, flush=True)
    numbers: dict[str, float] = {
        "base_reward": float(base_reward.mean()),
        "region_fraction": float(regions.float().mean()),
        "pictures_without_region": float((regions.flatten(1).sum(1) == 0).sum()),
    }
    for method, table in results.items():
        for key, values in table.items():
            numbers[f"{method}_{key}"] = statistics.mean(values)
            if len(values) > 1:
                numbers[f"{method}_{key}_std"] = statistics.stdev(values)
    numbers["ratio"] = numbers["focus-n-fix_psnr_outside"] / max(numbers["draft_psnr_outside"], 1e-9)
    numbers["reward_gain_ratio"] = numbers["focus-n-fix_reward_gain"] / (numbers["draft_reward_gain"] or 1e-9)
    numbers.update(seeds=float(len(args.seeds)), steps=float(args.steps), beta=args.beta,
                   seconds=time.perf_counter() - started, threads=float(args.threads))

    def spread(key: str, digits: int) -> str:
        """The mean, and its standard deviation over the seeds when there are several."""
        text = f"{numbers[key]:.{digits}f}"
        return text + (f"+-{numbers[key + '_std']:.{digits}f}" if key + "_std" in numbers else "")

    summary = (
        f"PSNR outside the problem regions {spread('focus-n-fix_psnr_outside', 2)} dB (Focus-N-Fix) vs "
        f"{spread('draft_psnr_outside', 2)} dB (DRaFT), ratio {with_target(numbers['ratio'], '>=', 1.5, '.2f')}; SSIM outside "
        f"{spread('focus-n-fix_ssim_outside', 3)} vs {spread('draft_ssim_outside', 3)}; reward gain "
        f"{spread('focus-n-fix_reward_gain', 2)} vs {spread('draft_reward_gain', 2)} (ratio "
        f"{with_target(numbers['reward_gain_ratio'], '>=', 0.8, '.2f')}; base reward {numbers['base_reward']:.2f}); prompts the "
        f"reward does not concern: PSNR {numbers['focus-n-fix_psnr_unconcerned']:.2f} vs "
        f"{numbers['draft_psnr_unconcerned']:.2f} dB, SSIM {numbers['focus-n-fix_ssim_unconcerned']:.3f} vs "
        f"{numbers['draft_ssim_unconcerned']:.3f}; problem regions cover {numbers['region_fraction']:.1%} of the "
        f"held-out red pictures; {len(args.seeds)} seed(s) x {args.steps} steps x batch {args.batch_size}, beta "
        f"{args.beta:g}, lr {args.learning_rate:g}, K {args.truncate_k} of {args.sampling_steps} DDIM steps, "
        f"red-content width {args.red_width:g}; "
        f"{args.threads} threads, {numbers['seconds']:.0f} s")
    return report("focus_n_fix_toyworld", numbers, summary, argv, write=not args.no_write)


if __name__ == "__main__":
    main()
