"""PQ-Map + AQ-Map of one picture against one plain image forward of the same tower (issue: maps speed).

A 512x512 picture and a 10-phrase prompt on a randomly initialised ViT-B/16-shaped open_clip tower (the compute of a
real one; weights do not change the time), CPU, torch threads = cores (``--threads``). Arms on the same picture, timed
side by side (``common.interleaved_median_seconds``: one warm-up round, which also fills the text caches, then
--repeats rounds in alternating order, so a background load hits every arm alike); text cached in all of them:
- plain forward (the floor): ``model.encode_image(preprocess(picture))``, the resize to the tower's 224 px input
  and one plain image forward, no text work (its text features would be cached);
- surgery encode: ``SurgeryCLIP.encode_image``, the resize and the CLIP-Surgery forward (CLS embedding and surgery
  patch features), reported;
- both maps: ``core.quality_maps.compute_quality_maps`` with the prompt, everything a map node computes: the
  surgery forward, the PQ-Map and AQ-Map arithmetic, the bicubic upsampling of both maps to 512x512, with the text
  features and the prompt's parse cached (the steady state of a node run again, or of a batch under one prompt;
  ``parse_seconds`` is what a new prompt's parse adds once).
``ratio`` = both maps / plain forward (``plain_text_cached: 1``). Target: ratio <= 1.05 (one forward serves both
maps: the maps may cost little over the forward they need).

Where the time went (issue 19, measured 1.13x): the surgery path recomputed each block's value projection, and the
maps upsampled with 16-tap bicubic kernels and re-parsed the prompt. Now the surgery blocks share the original
attention's V, the last block runs its attention output and FFN for the CLS token alone (the patch tokens' outputs
there feed nothing), so the surgery forward has 2 % fewer FLOPs than the plain one; the bicubic upsampling is two
small matrix products; parses are cached. Maps equal the previous ones within 1e-6.

Run: python benchmarks/maps_speed.py [--repeats 10] [--threads 2] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_median_seconds, limit_threads, load_average, report, with_target  # noqa: E402

from comfyui_refinery.core.clip_surgery import SurgeryCLIP  # noqa: E402
from comfyui_refinery.core.open_clip_files import build_open_clip  # noqa: E402
from comfyui_refinery.core.prompt_parsing import parse_prompt  # noqa: E402
from comfyui_refinery.core.quality_maps import compute_quality_maps  # noqa: E402

PROMPT = (
    "a red fox with a fluffy tail sitting on a mossy rock beside a small wooden bridge over a clear stream, "
    "a tall pine tree, a white cloud in a blue sky, a yellow flower near a grey stone"
)
IMAGE_SIZE = 512
RATIO_TARGET = 1.05


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds of the arms")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    threads = limit_threads(args.threads)
    load_before = load_average()
    import open_clip

    torch.manual_seed(0)
    model = build_open_clip(open_clip.get_model_config("ViT-B-16")).eval()
    encoder = SurgeryCLIP(model, "ViT-B-16")
    picture = torch.rand(1, IMAGE_SIZE, IMAGE_SIZE, 3)
    parse_prompt("a cat on a mat")  # the tagger's one-time start-up is nobody's per-prompt cost
    started = time.perf_counter()
    phrases = len(parse_prompt(PROMPT).phrases)
    parse_seconds = time.perf_counter() - started

    @torch.no_grad()
    def plain_forward():
        model.encode_image(encoder.preprocess(picture))

    def surgery_encode():
        encoder.encode_image(picture)

    def both_maps():
        compute_quality_maps(encoder, picture, prompt=PROMPT)

    seconds = interleaved_median_seconds(
        {"plain_forward": plain_forward, "surgery_encode": surgery_encode, "both_maps": both_maps}, args.repeats)
    ratio = seconds["both_maps"] / seconds["plain_forward"]
    numbers = {
        "ratio": ratio,
        "plain_text_cached": 1,
        "plain_forward_seconds": seconds["plain_forward"],
        "surgery_encode_seconds": seconds["surgery_encode"],
        "surgery_over_plain": seconds["surgery_encode"] / seconds["plain_forward"],
        "maps_seconds": seconds["both_maps"],
        "parse_seconds": parse_seconds,
        "phrases": float(phrases),
        "threads": float(threads),
        "image_size": float(IMAGE_SIZE),
        "load_average_start": load_before,
        "load_average_end": load_average(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }
    summary = (
        f"PQ+AQ maps {seconds['both_maps'] * 1000:.1f} ms vs one plain image forward "
        f"{seconds['plain_forward'] * 1000:.1f} ms at the same input (text cached in both), ratio {with_target(ratio, '<=', RATIO_TARGET)}; surgery encode "
        f"{seconds['surgery_encode'] * 1000:.1f} ms ({numbers['surgery_over_plain']:.3f}x); a new prompt's parse adds "
        f"{parse_seconds * 1000:.1f} ms once; random ViT-B/16, {IMAGE_SIZE} px picture, {phrases} phrases, {threads} "
        f"thread(s), CPU, median of {args.repeats} interleaved rounds, load average {load_before:.1f}-"
        f"{numbers['load_average_end']:.1f}"
    )
    return report("maps_speed", numbers, summary, argv, write=not args.no_write)


if __name__ == "__main__":
    main()
