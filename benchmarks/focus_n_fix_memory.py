"""Peak memory of one Focus-N-Fix training step for K = 1, 2, 4 steps of backpropagation (DRaFT-K), each at two
totals of sampling steps (issue target: memory grows with K, not with the number of sampling steps).

Model: a randomly initialised full-size SD1.5 (the shipped diffusers configs: UNet 860 M, VAE, CLIP-L), LoRA rank 8,
one prompt at --resolution (128 px by default), classifier-free guidance (the UNet sees a batch of 2), DDIM,
gradient checkpointing on the UNet and the VAE decoder (the trainer's default), reward: the toy red-content reward,
region: its saliency. The step is the trainer's own ``training_step`` + ``backward``: the reference sampled with the
LoRA disabled under no_grad, the first N - K steps under no_grad, the last K with gradients, decode, reward,
constraint.

Each (K, N) runs in its own fresh process (``common.run_measurement``), measured by ``common.step_memory`` as
``rankdpo_memory.py`` is: on CUDA ``max_memory_allocated`` after a warm-up step; on CPU the process's resident
memory, VmRSS just before the step (the loaded models) and the peak VmHWM during it, in a process whose glibc returns
freed blocks to the system (so resident memory follows the live tensors; limits: resident pages, not tensors, and the
first step's small lazy buffers count). Every figure is the step's increment above the loaded models (``k<K>_n<N>_
step_gib``); the whole peak (``_peak_gib``, weights included, about 4.3 GiB of them) is reported beside, not judged.

Targets, read operationally: memory independent of the number of sampling steps, ``ratio`` = the K = 2 step
increment at N = --steps-high over N = --steps-low <= 1.1; memory growing with K, ``k4_over_k1_step`` = the K = 4
over the K = 1 increment at N = --steps-high > 1.

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
from common import limit_threads, load_average, report, with_target  # noqa: E402
from common import random_sd15_models, run_measurement, step_memory  # noqa: E402  (the memory measurement)

KS = (1, 2, 4)
STEPS_RATIO_TARGET = 1.1


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
    models = random_sd15_models(resolution)
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

    return step_memory(lambda: step(1), device)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps-low", type=int, default=4, help="the smaller total of sampling steps")
    parser.add_argument("--steps-high", type=int, default=12, help="the larger total of sampling steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    threads = limit_threads(args.threads)
    load_before = load_average()
    started = time.perf_counter()
    gib = 1024**3
    numbers: dict[str, float] = {}
    runs = {}
    for steps in (args.steps_low, args.steps_high):
        for truncate_k in KS:
            run = run_measurement(__file__, "measure", threads, truncate_k=truncate_k, sampling_steps=steps,
                                  resolution=args.resolution)
            runs[(truncate_k, steps)] = run
            for figure in ("peak", "step", "before"):
                numbers[f"k{truncate_k}_n{steps}_{figure}_gib"] = run[f"{figure}_bytes"] / gib
            numbers[f"k{truncate_k}_n{steps}_seconds"] = run["seconds"]
            print(truncate_k, steps, {key: round(value / gib, 3) if key.endswith("bytes") else round(value, 2)
                                      for key, value in run.items()}, flush=True)
    low, high = args.steps_low, args.steps_high
    numbers["ratio"] = runs[(2, high)]["step_bytes"] / runs[(2, low)]["step_bytes"]
    numbers["ratio_is_step_increment"] = 1.0
    numbers["k4_over_k1_step"] = runs[(4, high)]["step_bytes"] / runs[(1, high)]["step_bytes"]
    numbers.update(resolution=float(args.resolution), steps_low=float(low), steps_high=float(high),
                   cuda=runs[(2, low)]["device_cuda"], threads=float(threads), load_average_start=load_before,
                   load_average_end=load_average())
    where = ("CUDA max_memory_allocated" if numbers["cuda"] else
             "CPU resident memory (VmRSS before, VmHWM peak; freed blocks returned to the system)")
    per_k = "; ".join(
        f"K={k}: {numbers[f'k{k}_n{low}_step_gib']:.2f} / {numbers[f'k{k}_n{high}_step_gib']:.2f} GiB"
        for k in KS)
    summary = (f"step memory above the loaded model at N = {low} / {high} sampling steps: {per_k}; ratio (K=2, "
               f"N={high} over N={low}) {with_target(numbers['ratio'], '<=', STEPS_RATIO_TARGET)}; K=4 over K=1 at "
               f"N={high} {with_target(numbers['k4_over_k1_step'], '>', 1.0, '.2f')}; whole peak K=2 (weights "
               f"included, not judged): {numbers[f'k2_n{low}_peak_gib']:.2f} / {numbers[f'k2_n{high}_peak_gib']:.2f} "
               f"GiB; random SD1.5, LoRA rank 8, 1 prompt at {args.resolution} px with CFG, gradient checkpointing, "
               f"{where}, one fresh process per (K, N), {threads} threads, load average {load_before:.1f}-"
               f"{numbers['load_average_end']:.1f}, {time.perf_counter() - started:.0f} s")
    return report("focus_n_fix_memory", numbers, summary, argv, write=not args.no_write)


if __name__ == "__main__":
    main()
