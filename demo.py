"""``refinery-demo``: the project's main job on the models it ships, offline, in well under a minute on a CPU.

Generates toy scenes with the tiny Stable-Diffusion pipeline, adds toy-world pictures with injected defects
(whose ground truth is known), computes the PQ-Map P and the AQ-Map A with toy-clip and its learned prompts, runs
the G-Refine two-stage refiner (core/refine_plan.py + core/diffusers_refiner.py) with the tiny pipeline on every
picture and scores the refined pictures again, and writes a picture grid (image | P over the picture | A over the
picture | mask Bi(1-P+A) | refined | ground truth) and a short markdown report (p and a before and after) into an
output folder, which it prints. ``--no-refine`` skips the refiner.

The toy world and its models live in ``benchmarks/toyworld/``; this module is the shipped console script.

Refined models: when LoRAs trained by the benchmarks are shipped in ``benchmarks/toyworld/models/loras/``
(``benchmarks/toyworld/demo_finetuned.py``), the base tiny-sd and each LoRA draw the same held-out captions from the
same noise; ``finetuned.png`` shows them side by side and the report adds their mean toy rewards. ``--no-finetuned``
skips this part.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .benchmarks.toyworld import data, defects, scenes
from .benchmarks.toyworld.train_prompts import load_alpha
from .core import masks, pq_map, visualize
from .core.clip_surgery import load_quality_clip
from .core.quality_maps import QualityMaps, compute_quality_maps
from .core.refine_plan import ImagePlan, RefinerSettings, plan_refinement

CELL = 160  # pixels per grid cell (64 px pictures are shown enlarged)
GUIDANCE = 4.0  # classifier-free guidance of the tiny pipeline, generating and refining
COLUMNS = ("picture", "P (red = good)", "A (red = fix)", "mask Bi(1-P+A)", "refined (both stages)", "ground truth")
REFINED_COLUMN = COLUMNS.index("refined (both stages)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="refinery-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("refinery-demo-output"),
                        help="folder for grid.png and report.md (created)")
    parser.add_argument("--generated", type=int, default=4, help="pictures to generate with the tiny pipeline")
    parser.add_argument("--defective", type=int, default=4, help="toy-world pictures with injected defects")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of the tiny pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.5, help="mask threshold on 1 - P + A")
    parser.add_argument("--refine-steps", type=int, default=10,
                        help="refiner steps of both stages together (n1 + n2; the paper uses 20)")
    parser.add_argument("--no-refine", action="store_true", help="only the quality maps, no refiner")
    parser.add_argument("--finetuned", type=int, default=4,
                        help="captions drawn by the base model and each shipped LoRA (0: skip that part)")
    parser.add_argument("--no-finetuned", dest="finetuned", action="store_const", const=0,
                        help="skip the shipped-LoRA comparison")
    args = parser.parse_args(argv)
    if args.finetuned < 0:
        parser.error(f"--finetuned must be >= 0, got {args.finetuned}")
    if args.generated < 0 or args.defective < 0 or args.generated + args.defective == 0:
        parser.error("--generated and --defective must be >= 0 and not both 0")
    if args.steps < 1 or args.refine_steps < 1:
        parser.error("--steps and --refine-steps must be >= 1")
    if not 0 <= args.threshold <= 1:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    return args


def load_tiny_pipeline():
    """The shipped tiny Stable-Diffusion pipeline, progress bars off (SystemExit naming the extra if diffusers is
    missing)."""
    try:
        from .benchmarks.toyworld.sd_pipeline import load_pipeline
    except ImportError as error:
        raise SystemExit(f"The demo needs diffusers and transformers ({error}): pip install 'comfyui-refinery[diffusers]'")

    pipeline = load_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate_pictures(pipeline, captions: list[str], steps: int, seed: int) -> torch.Tensor:
    """Tiny-SD pictures for ``captions``: (N, 64, 64, 3) float in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    output = pipeline(captions, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generator,
                      height=64, width=64, output_type="np")
    return torch.from_numpy(np.asarray(output.images)).float()


def refine(pipeline, images: torch.Tensor, maps: QualityMaps, captions: list[str], settings: RefinerSettings,
           seed: int) -> tuple[torch.Tensor, list[ImagePlan]]:
    """G-Refine's two stages on (N, H, W, 3) pictures in [0, 1] with their quality maps: returns the refined
    (N, H, W, 3) pictures in [0, 1] and the plans. Prompted with the plain captions."""
    from .core.diffusers_refiner import refine_with_pipeline

    plans = plan_refinement(maps.perceptual_map, maps.perceptual_score, maps.alignment_map, maps.alignment_score,
                            captions, settings)
    result = refine_with_pipeline(pipeline, images, plans, guidance_scale=GUIDANCE, seed=seed, progress=False)
    return result.images, plans


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


def write_grid(rows: list[list[Image.Image | None]], labels: list[str], path: Path,
               columns: tuple[str, ...] = COLUMNS) -> None:
    """Write a PNG of ``rows`` of CELL x CELL cells (None = blank) under the ``columns`` titles, each row with its
    label, atomically (a temporary file renamed onto ``path``)."""
    header, label_height = 18, 14
    grid = Image.new("RGB", (CELL * len(columns), header + len(rows) * (CELL + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(columns):
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


def write_text_atomically(text: str, path: Path) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, then rename it onto ``path``."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def collect_pictures(args: argparse.Namespace, pipeline) -> tuple[torch.Tensor, list[str], list, list[str]]:
    """The demo's pictures: ``args.generated`` tiny-SD pictures, then ``args.defective`` toy-world pictures with an
    injected defect. Returns (images (N, 64, 64, 3) in [0, 1], captions, ground-truth masks (None for generated
    pictures), notes on where each picture came from)."""
    pictures, captions, truths, notes = [], [], [], []
    if args.generated:
        generated_captions = [
            scenes.caption(scenes.sample_scene(np.random.default_rng(data.TEST_SEED_OFFSET + 9 * 10**6 + i)))
            for i in range(args.generated)
        ]
        pictures.append(generate_pictures(pipeline, generated_captions, args.steps, args.seed))
        captions += generated_captions
        truths += [None] * args.generated
        notes += ["generated by tiny-sd"] * args.generated
    if args.defective:
        images, defect_captions, defect_truths, kinds = defective_pictures(args.defective, args.seed)
        pictures.append(images)
        captions += defect_captions
        truths += defect_truths
        notes += [f"toy world, injected {kind}" for kind in kinds]
    return torch.cat(pictures), captions, truths, notes


def main(argv=None) -> int:
    """Console entry point (``refinery-demo``); returns the exit status: 0 when the grid and the report are written
    (2: a bad flag)."""
    run(argv)
    return 0


def run(argv=None) -> Path:
    """The demo as a Python call: parse ``argv`` (default ``sys.argv[1:]``), write the grid and the report, and
    return the output folder."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    start = time.time()
    torch.manual_seed(args.seed)
    pipeline = load_tiny_pipeline() if args.generated or not args.no_refine or args.finetuned else None
    images, captions, truths, notes = collect_pictures(args, pipeline)

    encoder = load_quality_clip(data.TOY_CLIP_CHECKPOINT)
    with torch.inference_mode():
        prompt_features = pq_map.encode_quality_prompts(encoder, pq_map.load_prompt_embeddings(data.TOY_PROMPTS))
    alpha = load_alpha(data.TOY_PROMPTS)
    knobs = dict(quality_prompts=prompt_features, alpha=alpha, prompt=captions)  # one toy-clip forward per batch
    maps = compute_quality_maps(encoder, images, **knobs)
    settings = RefinerSettings(total_steps=args.refine_steps, mask=masks.MaskSettings(threshold=args.threshold))
    binary, _ = masks.refine_mask(maps.perceptual_map, maps.alignment_map, **settings.mask.__dict__)  # (N, H, W) 0/1
    refined = plans = refined_maps = None
    if not args.no_refine:
        refined, plans = refine(pipeline, images, maps, captions, settings, args.seed)
        refined_maps = compute_quality_maps(encoder, refined, **knobs)
    p_overlay = visualize.heatmap_overlay(images, maps.perceptual_map)
    a_overlay = visualize.heatmap_overlay(images, maps.alignment_map)

    args.output.mkdir(parents=True, exist_ok=True)
    columns = COLUMNS if refined is not None else COLUMNS[:REFINED_COLUMN] + COLUMNS[REFINED_COLUMN + 1 :]
    table_head = "| # | source | caption | p | a | flagged phrases |"
    if refined is not None:
        table_head += " refiner | p refined | a refined |"
    intro = "Quality maps on the toy world (tiny models trained offline, shipped with the pack)" + (
        "." if refined is None else ", and the G-Refine refiner run with the tiny pipeline.")
    rows, labels = [], []
    report = ["# ComfyUI-Refinery demo", "", intro, "", table_head, "|" + "---|" * (table_head.count("|") - 1)]
    for index, caption in enumerate(captions):
        truth = truths[index]
        cells = [enlarge(images[index]), enlarge(p_overlay[index]), enlarge(a_overlay[index]), enlarge(binary[index])]
        if refined is not None:
            cells.append(enlarge(refined[index]))
        cells.append(None if truth is None else enlarge(torch.from_numpy(truth).float()))
        rows.append(cells)
        plan = None if plans is None else plans[index]
        label, line = describe(index, caption, notes[index], maps, refined_maps, plan)
        labels.append(label)
        report.append(line)
    write_grid(rows, labels, args.output / "grid.png", columns)
    report += ["", "![grid](grid.png)", "",
               f"P: perceptual quality (1 = good); A: alignment defects (1 = must change); mask: Bi(1-P+A) at "
               f"threshold {args.threshold}."]
    if refined is not None:
        report.append(
            f"Refined: G-Refine's stage 1 (masked re-denoise of the mask, strength from p and a) and stage 2 (whole "
            f"picture, strength {settings.global_strength}) with the tiny pipeline, {args.refine_steps} steps in all, "
            f"guidance {GUIDANCE}, the plain caption as prompt; p and a refined: the maps computed again on the "
            f"refined picture.")
    if args.finetuned:
        from .benchmarks.toyworld.demo_finetuned import finetuned_comparison

        titles, model_rows, lines = finetuned_comparison(pipeline, args.finetuned, args.steps, GUIDANCE, args.seed)
        if model_rows:
            write_grid([[enlarge(picture) for picture in row] for row in model_rows],
                       [f"{index}: same noise for every model" for index in range(len(model_rows))],
                       args.output / "finetuned.png", tuple(titles))
            report += [""] + lines
    report += [f"Ran in {time.time() - start:.1f} s.", ""]
    write_text_atomically("\n".join(report), args.output / "report.md")
    print(f"Wrote {args.output.resolve()}/grid.png and report.md")
    return args.output


def describe(index: int, caption: str, note: str, maps: QualityMaps, refined_maps: QualityMaps | None,
             plan: ImagePlan | None) -> tuple[str, str]:
    """(grid label, report table row) of picture ``index``; maps and refined_maps: the quality maps of the batch
    before and after the refiner (None without it)."""
    flagged = [f"{row.phrase} ({row.defect})" for row in maps.reports[index] if row.defect]
    p_before, a_before = float(maps.perceptual_score[index]), float(maps.alignment_score[index])
    label = f"{index}: p={p_before:.2f} a={a_before:.2f}"
    line = f"| {index} | {note} | {caption} | {p_before:.3f} | {a_before:.3f} | {'; '.join(flagged) or '-'} |"
    if refined_maps is not None:
        p_after, a_after = float(refined_maps.perceptual_score[index]), float(refined_maps.alignment_score[index])
        label += f" -> p={p_after:.2f} a={a_after:.2f}"
        line += f" {plan_note(plan)} | {p_after:.3f} | {a_after:.3f} |"
    return f"{label} {caption}", line


def plan_note(plan: ImagePlan) -> str:
    """What the refiner did to one picture, for the report."""
    if plan.skip_stage1 and plan.skip_stage2:
        return "untouched (passed the quality gate)"
    first = "stage 1 skipped (empty mask)" if plan.skip_stage1 else \
        f"stage 1 at {plan.stage1_strength:.2f} on {100 * float(plan.binary_mask.float().mean()):.0f}% of the pixels"
    return f"{first}, stage 2 at {plan.stage2_strength:.2f}"


if __name__ == "__main__":
    sys.exit(main())
