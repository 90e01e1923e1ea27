"""Memory of one RankDPO training step: above the loaded model against a plain LoRA step, and in all against a
two-UNet Diffusion-DPO step (issue: RankDPO memory).

The reference model of RankDPO is the same UNet with its LoRA disabled (``trainers/common/lora.py``
``adapters_disabled``), run under no_grad: a step should cost one activation-free forward more than a plain LoRA
step, and no second UNet. Three arms on the same batch:
- rankdpo: the trainer's own code (``trainers/rankdpo/train.py``): ``noisy_batch`` (VAE encode + noise),
  ``policy_prediction`` (UNet + LoRA, with gradients), ``reference_prediction`` (adapters disabled, no_grad), the
  RankDPO loss (eq. 5-7), ``backward``;
- plain_lora: ``noisy_batch``, ``policy_prediction``, the plain diffusion MSE, ``backward``;
- two_unet: the design this pack avoids, as in Diffusion-DPO's reference code (Wallace et al. 2023, a frozen
  ``ref_unet`` beside the trained one): the rankdpo arm with the reference predicted by a frozen copy of the UNet
  (taken before the LoRA is added) instead of the same UNet with adapters disabled. Same batch and loss, so only
  where the reference comes from differs.

Model: a randomly initialised full-size SD1.5 (``common.random_sd15_models``: UNet 860 M, VAE, CLIP-L text encoder,
about 4.3 GiB of float32 weights), LoRA rank 8 on the attention projections (the trainer's default), one prompt
group of k = --images images at --resolution (256 px by default: 32 x 32 latents). Each arm runs in its own fresh
process (``common.run_measurement``), the arms in alternating order, --repeats times; figures are medians.

Measured per arm (``common.step_memory``): on CUDA ``torch.cuda.max_memory_allocated`` after a warm-up step (peak
of live tensors; ``memory_allocated`` before the step = the loaded model); on CPU the process's resident memory:
VmRSS just before the step (the loaded model) and the peak VmHWM during it, in a process whose glibc returns freed
blocks to the system, so the resident memory follows the live tensors. Limits of the CPU figures: they count
resident pages, including the Python heap and the libraries (about 0.5 GiB, in every arm alike), not tensors; the
first step also allocates small lazy buffers (about 0.05 GiB, every arm alike).

Keys: ``ratio`` = rankdpo step increment (peak - before) / plain_lora step increment, target <= 1.2
(``ratio_is_step_increment: 1``: the weights, which would make any step's total close to 1.0x, are excluded);
``peak_vs_two_unet`` = rankdpo peak / two_unet peak (whole process or all allocated tensors), target <= 0.85;
``total_peak_ratio`` = rankdpo peak / plain_lora peak, beside them.

Run: python benchmarks/rankdpo_memory.py [--resolution 256] [--images 4] [--repeats 2] [--threads 2] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import limit_threads, load_average, report, with_target  # noqa: E402
from common import random_sd15_models, run_measurement, step_memory  # noqa: E402  (the memory measurement)

ARMS = ("rankdpo", "plain_lora", "two_unet")
INCREMENT_RATIO_TARGET = 1.2
PEAK_VS_TWO_UNET_TARGET = 0.85


def measure(arm: str, resolution: int, images: int) -> dict[str, float]:
    """One step of ``arm`` in this process; returns its memory figures (bytes) and seconds (``step_memory``)."""
    import torch

    from comfyui_refinery.core import rankdpo
    from comfyui_refinery.trainers.rankdpo import train as trainer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if arm == "two_unet":
        models, reference_unet = random_sd15_models(resolution, reference_copy=True)
    else:
        models, reference_unet = random_sd15_models(resolution), None
    for module in (models.unet, models.vae, *models.text_encoders, *([reference_unet] if reference_unet else [])):
        module.to(device)
    generator = torch.Generator().manual_seed(1)
    batch = {"prompts": ["a red circle on a blue background"], "group_sizes": [images],
             "pixels": torch.rand(images, 3, resolution, resolution, generator=generator) * 2 - 1,
             "win_rates": [torch.linspace(1, 0, images)]}
    parameters = [parameter for parameter in models.unet.parameters() if parameter.requires_grad]

    def step() -> None:
        noisy = trainer.noisy_batch(models, batch, seed=0, micro_index=0, device=device)
        policy = trainer.policy_prediction(models, noisy)  # (k, 4, h, w)
        if arm == "plain_lora":
            loss = rankdpo.denoising_errors(noisy.target, policy).mean()
        else:
            if arm == "rankdpo":
                reference = trainer.reference_prediction(models, noisy, batch["prompts"])
            else:
                with torch.no_grad():
                    reference = reference_unet(noisy.noisy, noisy.timesteps, noisy.hidden,
                                               added_cond_kwargs=noisy.added).sample
            scores = rankdpo.diffusion_scores(rankdpo.denoising_errors(noisy.target, policy),
                                              rankdpo.denoising_errors(noisy.target, reference))
            loss = rankdpo.rankdpo_loss(scores, batch["win_rates"][0].to(device))
        loss.backward()
        for parameter in parameters:
            parameter.grad = None

    return step_memory(step, device)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--images", type=int, default=4, help="k images of the one prompt group (the batch)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per arm (alternating order)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write results")
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    threads = limit_threads(args.threads)
    load_before = load_average()
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for arm in (ARMS if repeat % 2 == 0 else ARMS[::-1]):
            runs[arm].append(run_measurement(__file__, "measure", threads, arm=arm, resolution=args.resolution,
                                             images=args.images))
            print(arm, runs[arm][-1], flush=True)
    median = {arm: {key: statistics.median(run[key] for run in runs[arm]) for key in runs[arm][0]} for arm in ARMS}
    rank, plain, two_unet = median["rankdpo"], median["plain_lora"], median["two_unet"]
    gib = 1024**3
    numbers = {
        "ratio": rank["step_bytes"] / plain["step_bytes"],
        "ratio_is_step_increment": 1.0,
        "peak_vs_two_unet": rank["peak_bytes"] / two_unet["peak_bytes"],
        "total_peak_ratio": rank["peak_bytes"] / plain["peak_bytes"],
        **{f"{arm}_{figure}_gib": median[arm][f"{figure}_bytes"] / gib for arm in ARMS
           for figure in ("peak", "step", "before")},
        **{f"{arm}_step_seconds": median[arm]["seconds"] for arm in ARMS},
        "resolution": float(args.resolution),
        "images": float(args.images),
        "repeats": float(args.repeats),
        "cuda": rank["device_cuda"],
        "threads": float(threads),
        "load_average_start": load_before,
        "load_average_end": load_average(),
    }
    where = ("CUDA max_memory_allocated" if numbers["cuda"] else
             "CPU resident memory (VmRSS before, VmHWM peak; freed blocks returned to the system)")
    summary = (
        f"one step's memory above the loaded model: RankDPO {numbers['rankdpo_step_gib']:.2f} GiB vs plain LoRA "
        f"{numbers['plain_lora_step_gib']:.2f} GiB, ratio {with_target(numbers['ratio'], '<=', INCREMENT_RATIO_TARGET)}; "
        f"whole peak: RankDPO {numbers['rankdpo_peak_gib']:.2f} GiB vs a two-UNet Diffusion-DPO step (frozen reference "
        f"copy of the UNet) {numbers['two_unet_peak_gib']:.2f} GiB, peak_vs_two_unet "
        f"{with_target(numbers['peak_vs_two_unet'], '<=', PEAK_VS_TWO_UNET_TARGET)}; plain LoRA peak "
        f"{numbers['plain_lora_peak_gib']:.2f} GiB (RankDPO / plain {numbers['total_peak_ratio']:.3f}, loaded model "
        f"{numbers['rankdpo_before_gib']:.2f} GiB resident before the step); step time "
        f"{rank['seconds']:.0f} / {plain['seconds']:.0f} / {two_unet['seconds']:.0f} s (RankDPO / plain / two-UNet); "
        f"random SD1.5 (UNet 860 M), LoRA rank 8, k = {args.images} images at {args.resolution} px, {where}, median "
        f"of {args.repeats} fresh process(es) per arm, alternating order, {threads} threads, load average "
        f"{load_before:.1f}-{numbers['load_average_end']:.1f}, {time.perf_counter() - started:.0f} s")
    return report("rankdpo_memory", numbers, summary, argv, write=not args.no_write)


if __name__ == "__main__":
    main()
