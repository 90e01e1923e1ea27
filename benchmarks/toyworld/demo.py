"""``refinery-demo``: the project's main job on the models it ships, offline, in well under a minute on a CPU.

Generates toy scenes with the tiny Stable-Diffusion pipeline, adds toy-world pictures with injected defects
(whose ground truth is known), computes the PQ-Map P and the AQ-Map A with toy-clip and its learned prompts, and
writes a picture grid (image | P over the picture | A over the picture | mask Bi(1-P+A) | ground truth) and a
short markdown report into an output folder, which it prints.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ...core import aq_map, masks, pq_map, visualize
from ...core.clip_surgery import load_quality_clip
from . import data, defects, scenes
from .train_prompts import load_alpha

CELL = 160  # pixels per grid cell (64 px pictures are shown enlarged)
COLUMNS = ("picture", "P (red = good)", "A (red = fix)", "mask Bi(1-P+A)", "ground truth")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="refinery-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("refinery-demo-output"),
                        help="folder for grid.png and report.md (created)")
    parser.add_argument("--generated", type=int, default=4, help="pictures to generate with the tiny pipeline")
    parser.add_argument("--defective", type=int, default=4, help="toy-world pictures with injected defects")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of the tiny pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.5, help="mask threshold on 1 - P + A")
    args = parser.parse_args(argv)
    if args.generated < 0 or args.defective < 0 or args.generated + args.defective == 0:
        parser.error("--generated and --defective must be >= 0 and not both 0")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def generate_pictures(captions: list[str], steps: int, seed: int) -> torch.Tensor:
    """Tiny-SD pictures for ``captions``: (N, 64, 64, 3) float in [0, 1]."""
    try:
        from .sd_pipeline import load_pipeline
    except ImportError as error:
        raise SystemExit(f"The demo needs diffusers and transformers ({error}): pip install 'comfyui-refinery[diffusers]'")

    pipeline = load_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    output = pipeline(captions, num_inference_steps=steps, guidance_scale=4.0, generator=generator,
                      height=64, width=64, output_type="np")
    return torch.from_numpy(np.asarray(output.images)).float()


def defective_pictures(count: int, seed: int) -> tuple[torch.Tensor, list[str], list[np.ndarray], list[str]]:
    """Toy-world pictures with one injected defect each, cycling through every kind: (images, captions, ground-truth
    masks, kinds)."""
    images, captions, truths, kinds = [], [], [], []
    for index in range(count):
        kind = defects.KINDS[index % len(defects.KINDS)]
        rng = np.random.default_rng(data.TEST_SEED_OFFSET + 7 * 10**6 + seed * 1000 + index)
        scene = scenes.sample_scene(rng)
        while not defects.applicable(kind, scene):
            scene = scenes.sample_scene(rng)
        defect = defects.INJECTORS[kind](scenes.render(scene), scene, rng)
        images.append(torch.from_numpy(defect.image).float() / 255.0)
        captions.append(scenes.caption(scene))
        truths.append(defect.mask)
        kinds.append(kind)
    return torch.stack(images), captions, truths, kinds


def enlarge(picture: torch.Tensor) -> Image.Image:
    """(H, W, 3) or (H, W) in [0, 1] -> a CELL x CELL PIL image (nearest neighbour, so pixels stay visible)."""
    array = (picture.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array).resize((CELL, CELL), Image.NEAREST)


def write_grid(rows: list[list[Image.Image | None]], labels: list[str], path: Path) -> None:
    header, label_height = 18, 14
    grid = Image.new("RGB", (CELL * len(COLUMNS), header + len(rows) * (CELL + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(COLUMNS):
        draw.text((column * CELL + 4, 3), title, fill="black")
    for row, (cells, label) in enumerate(zip(rows, labels)):
        top = header + row * (CELL + label_height)
        draw.text((4, top), label[:110], fill="black")
        for column, cell in enumerate(cells):
            if cell is not None:
                grid.paste(cell, (column * CELL, top + label_height))
    temporary = path.with_name(path.name + ".tmp.png")
    grid.save(temporary)
    temporary.replace(path)


def main(argv=None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    start = time.time()
    torch.manual_seed(args.seed)
    generated_captions = [scenes.caption(scenes.sample_scene(np.random.default_rng(data.TEST_SEED_OFFSET + 9 * 10**6 + i)))
                          for i in range(args.generated)]
    pictures, captions, truths, notes = [], [], [], []
    if args.generated:
        pictures.append(generate_pictures(generated_captions, args.steps, args.seed))
        captions += generated_captions
        truths += [None] * args.generated
        notes += ["generated by tiny-sd"] * args.generated
    if args.defective:
        images, defect_captions, defect_truths, kinds = defective_pictures(args.defective, args.seed)
        pictures.append(images)
        captions += defect_captions
        truths += defect_truths
        notes += [f"toy world, injected {kind}" for kind in kinds]
    images = torch.cat(pictures)

    encoder = load_quality_clip(data.TOY_CLIP_CHECKPOINT)
    prompts = pq_map.load_prompt_embeddings(data.TOY_PROMPTS)
    with torch.inference_mode():
        features = encoder.encode_image(images)
        perceptual = pq_map.perceptual_quality(features, pq_map.encode_quality_prompts(encoder, prompts),
                                               encoder.logit_scale, load_alpha(data.TOY_PROMPTS))
        alignment = aq_map.alignment_quality(encoder, features, captions)
    binary, _ = masks.refine_mask(perceptual.map, alignment.map, threshold=args.threshold)
    p_overlay = visualize.heatmap_overlay(images, perceptual.map)
    a_overlay = visualize.heatmap_overlay(images, alignment.map)

    args.output.mkdir(parents=True, exist_ok=True)
    rows, labels, report = [], [], ["# ComfyUI-Refinery demo", "",
                                    "Quality maps on the toy world (tiny models trained offline, shipped with the pack).",
                                    "", "| # | source | caption | p | a | flagged phrases |", "|---|---|---|---|---|---|"]
    for index, caption in enumerate(captions):
        truth = truths[index]
        rows.append([enlarge(images[index]), enlarge(p_overlay[index]), enlarge(a_overlay[index]),
                     enlarge(binary[index]), None if truth is None else enlarge(torch.from_numpy(truth).float())])
        flagged = [f"{row.phrase} ({row.defect})" for row in alignment.reports[index] if row.defect]
        labels.append(f"{index}: p={float(perceptual.score[index]):.2f} a={float(alignment.score[index]):.2f} {caption}")
        report.append(f"| {index} | {notes[index]} | {caption} | {float(perceptual.score[index]):.3f} | "
                      f"{float(alignment.score[index]):.3f} | {'; '.join(flagged) or '-'} |")
    write_grid(rows, labels, args.output / "grid.png")
    report += ["", "![grid](grid.png)", "",
               f"P: perceptual quality (1 = good); A: alignment defects (1 = must change); mask: Bi(1-P+A) at "
               f"threshold {args.threshold}. Ran in {time.time() - start:.1f} s.", ""]
    (args.output / "report.md").write_text("\n".join(report), encoding="utf-8")
    print(f"Wrote {args.output.resolve()}/grid.png and report.md")
    return args.output


if __name__ == "__main__":
    main()
