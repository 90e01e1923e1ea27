"""Peak memory of one RankDPO training step versus one plain LoRA fine-tuning step on the same batch (issue target:
<= 1.2x). The reference model of RankDPO is the same UNet with its LoRA disabled (``trainers/common/lora.py``
``adapters_disabled``), run under no_grad, so the extra cost should be one activation-free forward.

Model: a randomly initialised full-size SD1.5 (the shipped diffusers configs of ``trainers/common/configs/sd15``:
UNet 860 M, VAE, CLIP-L text encoder), LoRA rank 8 on the attention projections (the trainer's default), one
prompt group of k = 4 images at --resolution (256 px by default: 32 x 32 latents).

Both steps run the trainer's own code (``trainers/rankdpo/train.py``): ``noisy_batch`` (VAE encode + noise),
``policy_prediction`` (UNet + LoRA with gradients), and then either ``reference_prediction`` + the RankDPO loss
(eq. 5-7) or the plain diffusion MSE; ``backward``. Each arm runs in its own fresh process, in alternating order,
``--repeats`` times.

Measured per arm: on CUDA ``torch.cuda.max_memory_allocated`` (peak of tensors); on CPU the process's peak resident
memory (VmHWM, reset with /proc/self/clear_refs right before the step) -- total peak, and the step's increment over
the resident memory just before it (model weights excluded). ``ratio`` is the total-peak ratio, what decides whether
a step fits on a device; the increment ratio is reported beside it.

Run: python benchmarks/rankdpo_memory.py [--resolution 256] [--repeats 2] [--threads 2] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import limit_threads, run_measurement, step_memory, write_results  # noqa: E402

ARMS = ("rankdpo", "plain_lora")


def build_models(resolution: int):
    """A random SD1.5 as the trainer's TrainingModels, LoRA rank 8 added (nothing downloaded)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from comfyui_refinery.trainers.common.lora import add_lora
    from comfyui_refinery.trainers.common.model_loading import diffusers_config_folder
    from comfyui_refinery.trainers.rankdpo.train import TrainingModels

    folder = diffusers_config_folder("sd15")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    add_lora(unet, rank=8)
    return TrainingModels(family="sd15", unet=unet, vae=vae.eval(), tokenizers=[CLIPTokenizer.from_pretrained(
        folder / "tokenizer")], text_encoders=[text_encoder.eval()],
        noise_scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"), resolution=resolution,
        trains_text_encoder=False)


def measure(arm: str, resolution: int, images: int) -> dict[str, float]:
    """One step of ``arm`` in this process; returns its memory figures (bytes) and seconds."""
    import torch

    from comfyui_refinery.core import rankdpo
    from comfyui_refinery.trainers.rankdpo import train as trainer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = build_models(resolution)
    for module in (models.unet, models.vae, *models.text_encoders):
        module.to(device)
    generator = torch.Generator().manual_seed(1)
    batch = {"prompts": ["a red circle on a blue background"], "group_sizes": [images],
             "pixels": torch.rand(images, 3, resolution, resolution, generator=generator) * 2 - 1,
             "win_rates": [torch.linspace(1, 0, images)]}
    parameters = [parameter for parameter in models.unet.parameters() if parameter.requires_grad]

    def step() -> None:
        noisy = trainer.noisy_batch(models, batch, seed=0, micro_index=0, device=device)
        policy = trainer.policy_prediction(models, noisy)
        if arm == "rankdpo":
            reference = trainer.reference_prediction(models, noisy, batch["prompts"])
            scores = rankdpo.diffusion_scores(rankdpo.denoising_errors(noisy.target, policy),
                                              rankdpo.denoising_errors(noisy.target, reference))
            loss = rankdpo.rankdpo_loss(scores, batch["win_rates"][0].to(device))
        else:
            loss = rankdpo.denoising_errors(noisy.target, policy).mean()
        loss.backward()
        for parameter in parameters:
            parameter.grad = None

    step()  # warm-up: lazy allocations (cuDNN / oneDNN workspaces) are not the step's
    return step_memory(step, device)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--images", type=int, default=4, help="k images of the one prompt group (the batch)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per arm (alternating)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write results")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: measure one arm, print JSON
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    import torch

    threads = args.threads or limit_threads()
    torch.set_num_threads(threads)
    if args.arm:
        print(json.dumps(measure(args.arm, args.resolution, args.images)))
        return {}
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for arm in (ARMS if repeat % 2 == 0 else ARMS[::-1]):
            runs[arm].append(run_measurement(__file__, ["--arm", arm, "--resolution", str(args.resolution),
                                                        "--images", str(args.images), "--threads", str(threads)]))
            print(arm, runs[arm][-1], flush=True)
    median = {arm: {key: statistics.median(run[key] for run in runs[arm]) for key in runs[arm][0]} for arm in ARMS}
    rank, plain = median["rankdpo"], median["plain_lora"]
    gib = 1024**3
    numbers = {
        "ratio": rank["peak_bytes"] / plain["peak_bytes"],
        "step_increment_ratio": rank["step_bytes"] / plain["step_bytes"],
        "rankdpo_peak_gib": rank["peak_bytes"] / gib,
        "plain_lora_peak_gib": plain["peak_bytes"] / gib,
        "rankdpo_step_gib": rank["step_bytes"] / gib,
        "plain_lora_step_gib": plain["step_bytes"] / gib,
        "rankdpo_step_seconds": rank["seconds"],
        "plain_lora_step_seconds": plain["seconds"],
        "resolution": float(args.resolution),
        "images": float(args.images),
        "cuda": rank["device_cuda"],
        "threads": float(threads),
    }
    where = "CUDA max_memory_allocated" if numbers["cuda"] else "CPU peak resident memory (VmHWM)"
    summary = (f"peak memory of one RankDPO step vs one plain LoRA step on the same batch: "
               f"{numbers['rankdpo_peak_gib']:.2f} vs {numbers['plain_lora_peak_gib']:.2f} GiB, ratio "
               f"{numbers['ratio']:.3f} (target <= 1.2); step increment over the loaded model "
               f"{numbers['rankdpo_step_gib']:.2f} vs {numbers['plain_lora_step_gib']:.2f} GiB (ratio "
               f"{numbers['step_increment_ratio']:.3f}); time {rank['seconds']:.1f} vs {plain['seconds']:.1f} s; "
               f"random SD1.5 (UNet 860 M), LoRA rank 8, k = {args.images} images at {args.resolution} px, {where}, "
               f"median of {args.repeats} fresh processes per arm, {threads} threads, {time.perf_counter() - started:.0f} s")
    print(summary)
    if not args.no_write:
        write_results("rankdpo_memory", numbers, summary, argv)
    return numbers


if __name__ == "__main__":
    main()
