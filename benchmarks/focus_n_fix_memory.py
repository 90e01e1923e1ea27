"""Peak memory of one Focus-N-Fix training step for K = 1, 2, 4 steps of backpropagation (DRaFT-K), each at two
totals of sampling steps (issue target: memory grows with K, not with the number of sampling steps).

Model: a randomly initialised full-size SD1.5 (the shipped diffusers configs: UNet 860 M, VAE, CLIP-L), LoRA rank 8,
one prompt at --resolution (128 px by default), classifier-free guidance (the UNet sees a batch of 2), DDIM,
gradient checkpointing on the UNet and the VAE decoder (the trainer's default), reward: the toy red-content reward,
region: its saliency. The step is the trainer's own ``training_step`` + ``backward``: the reference sampled with the
LoRA disabled under no_grad, the first N - K steps under no_grad, the last K with gradients, decode, reward,
constraint.

Each (K, N) runs in its own fresh process: on CPU the process's peak resident memory during its first step (VmHWM,
reset right before it) and that step's increment over the resident memory of the loaded models (no warm-up step:
the allocator keeps what a step frees resident, which would hide the next step's need); on CUDA
``max_memory_allocated`` after a warm-up step. ``ratio`` = the step increment at N = --steps-high over N = --steps-low for the default
K = 2 (1.0 = independent of the number of sampling steps).

Run: python benchmarks/focus_n_fix_memory.py [--resolution 128] [--steps-low 4] [--steps-high 12] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import limit_threads, run_measurement, step_memory, write_results  # noqa: E402
from rankdpo_memory import build_models  # noqa: E402

KS = (1, 2, 4)


def measure(truncate_k: int, sampling_steps: int, resolution: int) -> dict[str, float]:
    """One Focus-N-Fix step with K = truncate_k of sampling_steps in this process: memory (bytes) and seconds."""
    import torch

    from comfyui_refinery.benchmarks.toyworld.rewards import RedContentReward
    from comfyui_refinery.trainers.common.config import TrainingConfig
    from comfyui_refinery.trainers.common.lora import lora_parameters, set_gradient_checkpointing
    from comfyui_refinery.trainers.common.model_loading import diffusers_config_folder
    from comfyui_refinery.trainers.focus_n_fix import train as trainer
    from comfyui_refinery.trainers.focus_n_fix.config import FocusNFixConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = build_models(resolution)
    scheduler_config = json.loads((diffusers_config_folder("sd15") / "scheduler" / "scheduler_config.json").read_text())
    models.sampling_scheduler_config = scheduler_config
    set_gradient_checkpointing(models.unet, True)
    set_gradient_checkpointing(models.vae, True)
    for module in (models.unet, models.vae, *models.text_encoders):
        module.to(device)
    scratch = Path(tempfile.mkdtemp())
    config = FocusNFixConfig(prompts=scratch, model=scratch, reward=scratch,
                             training=TrainingConfig(output_dir=scratch), beta=0.5, truncate_k=truncate_k,
                             sampling_steps=sampling_steps, guidance_scale=7.5, mask_samples=0)
    reward = RedContentReward().to(device)
    score = trainer.reward_function(reward)
    region = trainer.make_region_function(config, reward, device)
    parameters = lora_parameters(models.unet)

    def step(micro_index: int) -> None:
        result = trainer.training_step(config, models, score, region, ["a red circle on a blue background"],
                                       micro_index, device)
        result.loss.backward()
        for parameter in parameters:
            parameter.grad = None

    if device.type == "cuda":
        step(0)  # warm-up: lazy allocations (cuDNN workspaces) are not the step's
    # no warm-up on CPU: memory a step frees stays resident, and would hide the next step's need
    return step_memory(lambda: step(1), device)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps-low", type=int, default=4, help="the smaller total of sampling steps")
    parser.add_argument("--steps-high", type=int, default=12, help="the larger total of sampling steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--arm", nargs=2, type=int, metavar=("K", "N"), help=argparse.SUPPRESS)  # internal
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    import torch

    threads = args.threads or limit_threads()
    torch.set_num_threads(threads)
    if args.arm:
        print(json.dumps(measure(args.arm[0], args.arm[1], args.resolution)))
        return {}
    started = time.perf_counter()
    gib = 1024**3
    numbers: dict[str, float] = {}
    runs = {}
    for steps in (args.steps_low, args.steps_high):
        for truncate_k in KS:
            run = run_measurement(__file__, ["--arm", str(truncate_k), str(steps), "--resolution",
                                             str(args.resolution), "--threads", str(threads)])
            runs[(truncate_k, steps)] = run
            numbers[f"k{truncate_k}_n{steps}_peak_gib"] = run["peak_bytes"] / gib
            numbers[f"k{truncate_k}_n{steps}_step_gib"] = run["step_bytes"] / gib
            numbers[f"k{truncate_k}_n{steps}_seconds"] = run["seconds"]
            print(truncate_k, steps, {key: round(value / gib, 3) if key.endswith("bytes") else round(value, 2)
                                      for key, value in run.items()}, flush=True)
    low, high = args.steps_low, args.steps_high
    numbers["ratio"] = runs[(2, high)]["step_bytes"] / runs[(2, low)]["step_bytes"]
    numbers["k4_over_k1_step"] = runs[(4, high)]["step_bytes"] / runs[(1, high)]["step_bytes"]
    numbers.update(resolution=float(args.resolution), steps_low=float(low), steps_high=float(high),
                   cuda=runs[(2, low)]["device_cuda"], threads=float(threads))
    where = "CUDA max_memory_allocated" if numbers["cuda"] else "CPU peak resident memory (VmHWM)"
    per_k = "; ".join(
        f"K={k}: {numbers[f'k{k}_n{low}_step_gib']:.2f} / {numbers[f'k{k}_n{high}_step_gib']:.2f} GiB"
        for k in KS)
    summary = (f"step memory increment over the loaded model at N = {low} / {high} sampling steps: {per_k}; ratio "
               f"(K=2, N={high} over N={low}) {numbers['ratio']:.3f} (1 = independent of N); K=4 over K=1 "
               f"{numbers['k4_over_k1_step']:.2f}x; peak K=2: {numbers[f'k2_n{low}_peak_gib']:.2f} / "
               f"{numbers[f'k2_n{high}_peak_gib']:.2f} GiB; random SD1.5, LoRA rank 8, 1 prompt at {args.resolution} "
               f"px with CFG, gradient checkpointing, {where}, one fresh process per (K, N), {threads} threads, "
               f"{time.perf_counter() - started:.0f} s")
    print(summary)
    if not args.no_write:
        write_results("focus_n_fix_memory", numbers, summary, argv)
    return numbers


if __name__ == "__main__":
    main()
