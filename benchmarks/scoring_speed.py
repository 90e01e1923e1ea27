"""Batched reward scoring of 16 images versus a per-image loop on the same reward (issue: preference scoring).

Both sides score the same 16 images (512x512, different prompts per image, text features cached after the warm-up,
as in a node that runs again) with ``RewardModel.score``: one call on the batch versus 16 calls of one image. Two
rewards: CLIPScore on the toy world's tower (``toy-clip``, shipped; tiny, so per-call overhead dominates) and on a
randomly initialised ViT-B/16-shaped open_clip tower (the compute of a real CLIP; weights do not change the time).
CPU, torch threads = cores. Target: ratio (batched speed-up on the ViT-B/16 tower) >= 4.

Run: python benchmarks/scoring_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import limit_threads, median_seconds, write_results  # noqa: E402

from comfyui_refinery.benchmarks.toyworld import data  # noqa: E402
from comfyui_refinery.core.rewards import load_clip_score  # noqa: E402

BATCH = 16


def vit_b16_checkpoint(folder: Path) -> Path:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    path = folder / "vit-b-16-random.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def speedup(reward, images: torch.Tensor, prompts: list[str], repeats: int) -> tuple[float, float]:
    """(batched seconds, per-image loop seconds), medians."""
    def batched():
        reward.score(images, prompts)

    def loop():
        for index in range(images.shape[0]):
            reward.score(images[index:index + 1], prompts[index])

    return median_seconds(batched, repeats), median_seconds(loop, repeats)


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    cores = limit_threads()
    torch.manual_seed(0)
    images = torch.rand(BATCH, 512, 512, 3)
    prompts = [f"a photo of object number {index} on a table" for index in range(BATCH)]
    numbers: dict[str, float] = {"images": BATCH, "threads": cores}
    with tempfile.TemporaryDirectory() as folder:
        towers = {"toy_clip": (data.TOY_CLIP_CHECKPOINT, "auto"),
                  "vit_b16": (vit_b16_checkpoint(Path(folder)), "ViT-B-16")}
        for label, (checkpoint, architecture) in towers.items():
            reward = load_clip_score(checkpoint, architecture, batch_size=BATCH)
            batched, loop = speedup(reward, images, prompts, args.repeats)
            numbers[f"{label}_batched_seconds"] = batched
            numbers[f"{label}_loop_seconds"] = loop
            numbers[f"{label}_speedup"] = loop / batched
            print(f"{label}: batched {batched:.3f} s, per-image loop {loop:.3f} s -> {loop / batched:.2f}x")
    numbers["ratio"] = numbers["vit_b16_speedup"]
    if not args.no_write:
        write_results(
            "scoring_speed", numbers,
            f"16 images 512 px, CLIPScore, {cores} CPU threads: batched vs per-image loop {numbers['ratio']:.2f}x on a "
            f"ViT-B/16-shaped tower ({numbers['vit_b16_batched_seconds']:.2f} s vs "
            f"{numbers['vit_b16_loop_seconds']:.2f} s), {numbers['toy_clip_speedup']:.2f}x on toy-clip",
            argv,
        )
    return numbers


if __name__ == "__main__":
    main()
