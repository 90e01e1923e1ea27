"""PQ-Map + AQ-Map versus one plain open_clip image forward + one text forward (issue: maps speed).

A 512x512 image and a 10-phrase prompt on a randomly initialised ViT-B/16-shaped tower, CPU, torch threads =
cores. Both sides include the resize of the image to the tower's input. The maps side runs one CLIP-Surgery
forward shared by both maps, with text features cached (the steady state of a node that runs again), and
includes parsing, all map arithmetic and the bicubic upsampling to 512x512. Target: ratio <= 1.3.

Run: python benchmarks/maps_speed.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import limit_threads, median_seconds, write_results  # noqa: E402

from comfyui_refinery.core import aq_map, pq_map  # noqa: E402
from comfyui_refinery.core.clip_surgery import SurgeryCLIP  # noqa: E402
from comfyui_refinery.core.prompt_parsing import parse_prompt  # noqa: E402

PROMPT = (
    "a red fox with a fluffy tail sitting on a mossy rock beside a small wooden bridge over a clear stream, "
    "a tall pine tree, a white cloud in a blue sky, a yellow flower near a grey stone"
)


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    cores = limit_threads()
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    encoder = SurgeryCLIP(model, "ViT-B-16")
    phrases = len(parse_prompt(PROMPT).phrases)
    image = torch.rand(1, 512, 512, 3)
    tokens = encoder.tokenizer([PROMPT])
    prompts = pq_map.text_quality_prompts()

    @torch.inference_mode()
    def plain_clip():
        model.encode_image(encoder.preprocess(image))
        model.encode_text(tokens)

    @torch.inference_mode()
    def quality_maps():
        features = encoder.encode_image(image)
        pq_map.perceptual_quality(features, pq_map.encode_quality_prompts(encoder, prompts), encoder.logit_scale)
        aq_map.alignment_quality(encoder, features, [PROMPT])

    plain_seconds = median_seconds(plain_clip, args.repeats)
    maps_seconds = median_seconds(quality_maps, args.repeats)  # warm-up fills the text cache
    numbers = {
        "ratio": maps_seconds / plain_seconds,
        "maps_seconds": maps_seconds,
        "plain_clip_seconds": plain_seconds,
        "phrases": float(phrases),
        "threads": float(cores),
        "image_size": 512.0,
    }
    summary = (
        f"PQ+AQ {maps_seconds * 1000:.1f} ms vs plain image+text forward {plain_seconds * 1000:.1f} ms, "
        f"ratio {numbers['ratio']:.3f} (target <= 1.3), ViT-B/16 shape, {phrases} phrases, {cores} threads, CPU"
    )
    print(summary)
    write_results("maps_speed", numbers, summary, argv)
    return numbers


if __name__ == "__main__":
    main()
