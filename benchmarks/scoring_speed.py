"""What batched reward scoring costs over the model itself, and what batching saves over a per-image loop (issue:
preference scoring).

Three arms on the same 16 pictures (512x512, one prompt per picture), timed side by side
(``common.interleaved_median_seconds``: one warm-up round, which also fills the text cache, then --repeats rounds in
alternating order, so a background load hits every arm alike):
- batched: ``RewardModel.score(images, prompts)``, one call for the 16 pictures, text features cached (the steady
  state of a node that runs again): conversion, resize and normalisation to the tower's input, image forward,
  cosine with the cached text features;
- bare forward: the tower's ``encode_image`` alone on the same batch, preprocessed once beforehand (what the model
  itself costs; no text either, as the text is cached in the batched arm);
- per-image loop: 16 calls of ``score`` with one picture each, text cached.
Rewards: CLIPScore on a randomly initialised ViT-B/16-shaped open_clip tower (the compute of a real CLIP; weights do
not change the time) and, for the fixed per-call costs, on the toy world's tiny ``toy-clip`` (shipped).

CPU, torch threads = cores. ``ratio`` = batched seconds / bare-forward seconds on the ViT-B/16 tower
(``baseline_is_bare_forward: 1``). Target: ratio <= 1.05 (a guard against regressions: scoring may add little over
the image forward it needs). Batching cannot pay off on a CPU whose cores one image already fills; the per-image
loop is reported beside (``vit_b16_loop_over_batched``), without a target.
On a machine with CUDA (``torch.cuda.is_available()``), the same three arms also run on the GPU (pictures handed
over on the CPU, as ComfyUI's IMAGE tensors are): ``gpu_speedup`` = per-image loop seconds / batched seconds, target
>= 4 (the GPU is where batching pays), ``gpu_ratio`` = batched / bare forward, and ``gpu_device_name``. Without a GPU
the GPU keys are absent and the RESULTS.md line says so.

Run: python benchmarks/scoring_speed.py [--repeats 5] [--no-write]   (the same command on a GPU machine)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_median_seconds, limit_threads, load_average, report, with_target  # noqa: E402

from comfyui_refinery.benchmarks.toyworld import data  # noqa: E402
from comfyui_refinery.core.rewards import load_clip_score  # noqa: E402
from comfyui_refinery.core.rewards.preprocessing import rgb_pixels  # noqa: E402

BATCH = 16
CPU_RATIO_TARGET = 1.05
GPU_SPEEDUP_TARGET = 4.0


def vit_b16_checkpoint(folder: Path) -> Path:
    """A randomly initialised open_clip ViT-B-16, saved as safetensors in ``folder`` (nothing downloaded)."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    path = folder / "vit-b-16-random.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def time_arms(reward, images: torch.Tensor, prompts: list[str], repeats: int) -> dict[str, float]:
    """Median seconds of the three arms (module docstring) on ``reward``'s device: batched, bare_forward, loop.
    images: (B, H, W, 3) in [0, 1] on the CPU; prompts: B strings."""
    device = reward.device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        tower_input = reward.preprocess(rgb_pixels(images).to(device)).to(reward.dtype)  # (B, 3, h, w)

    def batched():
        reward.score(images, prompts)
        synchronize()

    @torch.no_grad()
    def bare_forward():
        reward.model.encode_image(tower_input)
        synchronize()

    def loop():
        for index in range(images.shape[0]):
            reward.score(images[index : index + 1], prompts[index])
        synchronize()

    return interleaved_median_seconds({"batched": batched, "bare_forward": bare_forward, "loop": loop}, repeats)


def main(argv=None) -> dict[str, float | str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of the three arms")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    cores = limit_threads()
    load_before = load_average()
    torch.manual_seed(0)
    images = torch.rand(BATCH, 512, 512, 3)
    prompts = [f"a photo of object number {index} on a table" for index in range(BATCH)]
    numbers: dict[str, float | str] = {"images": BATCH, "threads": cores, "baseline_is_bare_forward": 1}
    lines = []
    with tempfile.TemporaryDirectory() as folder:
        towers = {"vit_b16": (vit_b16_checkpoint(Path(folder)), "ViT-B-16"),
                  "toy_clip": (data.TOY_CLIP_CHECKPOINT, "auto")}
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            for label, (checkpoint, architecture) in towers.items():
                if device == "cuda" and label != "vit_b16":
                    continue
                reward = load_clip_score(checkpoint, architecture, batch_size=BATCH).to(device)
                seconds = time_arms(reward, images, prompts, args.repeats)
                prefix = label if device == "cpu" else "gpu"
                for arm, value in seconds.items():
                    numbers[f"{prefix}_{arm}_seconds"] = value
                numbers[f"{prefix}_over_bare_forward"] = seconds["batched"] / seconds["bare_forward"]
                numbers[f"{prefix}_loop_over_batched"] = seconds["loop"] / seconds["batched"]
                lines.append(f"{prefix}: batched {seconds['batched']:.3f} s, bare forward "
                             f"{seconds['bare_forward']:.3f} s, per-image loop {seconds['loop']:.3f} s")
                print(lines[-1], flush=True)
    numbers["ratio"] = numbers["vit_b16_over_bare_forward"]
    numbers.update(load_average_start=load_before, load_average_end=load_average())
    cpu = (f"16 pictures 512 px, CLIPScore on a ViT-B/16-shaped tower, {cores} CPU threads: batched scoring "
           f"{numbers['vit_b16_batched_seconds']:.2f} s vs the bare image forward on the same preprocessed batch "
           f"{numbers['vit_b16_bare_forward_seconds']:.2f} s (text cached in both), ratio "
           f"{with_target(numbers['ratio'], '<=', CPU_RATIO_TARGET)}; per-image loop "
           f"{numbers['vit_b16_loop_seconds']:.2f} s ({numbers['vit_b16_loop_over_batched']:.2f}x the batched time, "
           f"no CPU target); toy-clip (fixed per-call costs): batched {numbers['toy_clip_batched_seconds'] * 1000:.0f} "
           f"ms, bare forward {numbers['toy_clip_bare_forward_seconds'] * 1000:.0f} ms, loop "
           f"{numbers['toy_clip_loop_seconds'] * 1000:.0f} ms")
    if torch.cuda.is_available():
        numbers["gpu_device_name"] = torch.cuda.get_device_name()
        numbers["gpu_speedup"] = numbers["gpu_loop_over_batched"]
        numbers["gpu_ratio"] = numbers["gpu_over_bare_forward"]
        gpu = (f"GPU ({numbers['gpu_device_name']}, float32): per-image loop {numbers['gpu_loop_seconds'] * 1000:.1f} "
               f"ms vs batched {numbers['gpu_batched_seconds'] * 1000:.1f} ms, speed-up "
               f"{with_target(numbers['gpu_speedup'], '>=', GPU_SPEEDUP_TARGET, '.2f')}; batched / bare forward "
               f"{numbers['gpu_ratio']:.3f}")
    else:
        gpu = f"no GPU on this machine: the GPU target (batched >= {GPU_SPEEDUP_TARGET:g}x the loop) not measured"
    summary = (f"{cpu}; {gpu}; median of {args.repeats} interleaved rounds, load average {load_before:.1f}-"
               f"{numbers['load_average_end']:.1f}")
    return report("scoring_speed", numbers, summary, argv, write=not args.no_write)


if __name__ == "__main__":
    main()
