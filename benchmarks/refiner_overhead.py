"""G-Refine (RefineryGRefine) wall time versus a plain KSampler img2img with the same total steps (issue: refiner
overhead). Target: ratio = refiner seconds / plain seconds <= 1.10.

Both arms run as API-format graphs in ONE in-process ComfyUI 0.8 on CPU (``tests/comfyui_harness.py``; the tests
folder is put on ``sys.path`` so the harness and ``tests/sd15_checkpoint.py`` are imported from there, as conftest
does), on the same random full-size SD1.5 UNet / CLIP-L / VAE (``install_sd15``: built once per machine into the
test cache, then linked), with the same sampler, scheduler, cfg and seed:

- plain:   LoadImage -> VAEEncode -> KSampler(steps = total steps, denoise = the refiner's stage-1 strength) ->
           VAEDecode -> PreviewImage (prompt and negative through CLIPTextEncode)
- refiner: LoadImage -> RefineryGRefine(total_steps = total steps, never gated: perceptual_gate = alignment_gate =
           1.01) -> PreviewImage

The quality CLIP of the maps is a randomly initialised open_clip ViT-B-16 (the real tower's shape, so the maps cost
what they cost with real weights), saved as safetensors into the harness's models/quality_clip/ and loaded with
architecture ``ViT-B-16``; the quality prompts are the plain-text pairs (nothing connected).

Every repeat is a fresh run of both arms: a new input picture (so LoadImage, VAEEncode and the maps really execute;
ComfyUI's CLASSIC cache would otherwise reuse them) and a new seed, the same for both arms. The loaders, and the plain
arm's two CLIPTextEncode nodes, stay cached, as they do when a user queues the next picture: every graph lists all
shared nodes (loaders, LoadImage, text encodes) so ComfyUI keeps their outputs between the two arms. G-Refine
encodes its (emphasized) prompt and negative prompt inside the node on every run; that cost is counted as refiner
overhead and reported (``refiner_text_encode_seconds``). The arms are interleaved (warm-up refiner, warm-up plain,
then refiner, plain | plain, refiner | refiner, plain ...: the order flips every repeat so a drifting background load
hits both alike); ``ratio`` is the median refiner time over the median plain time of ``--repeats`` runs each, and
``ratio_pairs_median`` the median of the per-repeat ratios. ``cpu_ratio`` is the same from the process's CPU seconds
(all threads), which other jobs on a shared machine disturb less than wall time.

The split (where the refiner's time goes) comes from timers wrapped around ``compute_quality_maps`` and ``run_stage``
in the pack's refiner module and around ComfyUI's ``comfy.sample.sample``, ``VAE.encode/decode`` and
``CLIP.tokenize / encode_from_tokens_scheduled``, in both arms (a perf_counter pair per call; nothing else changes).
The mask share (what part of the picture stage 1 re-denoised) is read from G-Refine's plan summary. With the random
tower the maps mark nearly every pixel (P ~ 0 and A ~ 1, so clamp(1 - P + A) = 1 is above any threshold <= 1; no
seed or threshold gives a partial mask reliably), so stage 1 re-denoises 100 % of the picture. Its cost does not
depend on the share: ComfyUI's masked sampling (``noise_mask``, ``comfy.samplers.KSamplerX0Inpaint``) runs the UNet on
the whole latent every step and only blends by the mask, so a realistic 20-50 % mask costs the same (an empty mask
would skip stage 1 and make the refiner cheaper; the script fails if stage 1 did not run).

Size and time: 256 px and 20 steps by default. On the 2-core machine with nothing else running this takes about
6 minutes (about 2.5 s per UNet step, cfg batch of 2); with other jobs on the machine a step took 5-28 s and the
per-repeat ratios swung from 0.26 to 1.70 (the first run, at 128 px, see RESULTS.md), so read ``load_average_*``
and compare ``ratio`` with ``ratio_pairs_median`` and ``cpu_ratio`` before trusting a run. A smaller ``--size`` makes
the fixed costs (maps, text encoding) weigh more, so its ratio bounds the 256 px one from above. The warm-up runs
each arm with ``--warmup-steps`` (2) total steps: it only loads the models, fills the quality tower's text cache and
picks the plain denoise.

Run: python benchmarks/refiner_overhead.py [--size 256] [--steps 20] [--repeats 3] [--threshold 0.5] [--no-write]
Needs ComfyUI 0.8 ($COMFYUI_DIR, as the tests) and diffusers/transformers/open_clip (the test extras). About
5 GB of RAM for the models.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

BENCHMARKS_DIR = Path(__file__).resolve().parent
PACK_ROOT = BENCHMARKS_DIR.parent
TESTS_DIR = PACK_ROOT / "tests"
sys.path.insert(0, str(BENCHMARKS_DIR))
sys.path.insert(0, str(TESTS_DIR))  # the ComfyUI harness and the random SD1.5 builder live with the tests
from comfyui_harness import ComfyHarness, find_comfyui
from common import limit_threads, report, with_target

PROMPT = "a red fox sitting on a mossy rock beside a wooden bridge, a tall pine tree, a white cloud in a blue sky"
NEGATIVE = "blurry, low quality"
SAMPLING = {"sampler_name": "euler", "scheduler": "normal", "cfg": 7.0}
QUALITY_CLIP_NAME = "vit-b-16-random.safetensors"
SEED_BASE = 1000


# -- models and pictures ---------------------------------------------------------------------------------------------
def build_quality_clip(folder: Path) -> str:
    """A randomly initialised open_clip ViT-B-16 (the real tower's shapes) as safetensors; returns its file name."""
    import open_clip
    from safetensors.torch import save_file

    path = folder / QUALITY_CLIP_NAME
    if not path.is_file():
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-16", pretrained=None)
        with torch.no_grad():  # a trained-like temperature (as tests/tiny_models.py); the cost does not depend on it
            model.logit_scale.fill_(torch.tensor(100.0).log())
        save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return path.name


def write_picture(path: Path, size: int, seed: int) -> None:
    """A size x size RGB scene: colour ramps, a sky band, a few discs and boxes at seeded places."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.zeros((size, size, 3), np.float32)
    pixels[..., 0] = 40 + 80 * x / size
    pixels[..., 1] = 90 + 100 * y / size
    pixels[..., 2] = 60 + 60 * (1 - y / size)
    pixels[: size // 3] = (110, 160, 230)  # sky
    for _ in range(4):
        colour = rng.integers(20, 240, 3)
        cx, cy, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 12, size // 5))]
        if rng.random() < 0.5:
            pixels[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = colour
        else:
            pixels[max(cy - r, 0):cy + r, max(cx - r, 0):cx + r] = colour
    pixels += rng.normal(0, 6, pixels.shape)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB").save(path)


# -- graphs ------------------------------------------------------------------------------------------------------------
def shared_nodes(models: dict[str, str], quality_clip: str, picture: str) -> dict:
    """Nodes in both graphs (so ComfyUI's cache keeps their outputs across the two arms)."""
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": models["unet"], "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader",
                 "inputs": {"clip_name": models["text_encoders"], "type": "stable_diffusion"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": models["vae"]}},
        "quality": {"class_type": "RefineryQualityModelLoader",
                    "inputs": {"checkpoint": quality_clip, "architecture": "ViT-B-16", "surgery_depth": 0}},
        "image": {"class_type": "LoadImage", "inputs": {"image": picture}},
        "positive": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": PROMPT}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": NEGATIVE}},
    }


def plain_graph(shared: dict, seed: int, steps: int, denoise: float) -> dict:
    return {
        **shared,
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["vae", 0]}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["unet", 0], "positive": ["positive", 0], "negative": ["negative", 0],
            "latent_image": ["encode", 0], "seed": seed, "steps": steps, "denoise": denoise, **SAMPLING}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }


def refiner_graph(shared: dict, seed: int, steps: int, threshold: float) -> dict:
    knobs = {"threshold": threshold, "min_area": 64, "dilation": 4, "feather": 4.0, "strength_min": 0.3,
             "strength_max": 0.8, "global_strength": 0.1, "total_steps": steps, "stage1_share": 0.5,
             "perceptual_gate": 1.01, "alignment_gate": 1.01, "gated_untouched": True, "mask_mode": "binary"}
    return {
        **shared,
        "refine": {"class_type": "RefineryGRefine", "inputs": {
            "model": ["unet", 0], "clip": ["clip", 0], "vae": ["vae", 0], "image": ["image", 0],
            "quality_clip": ["quality", 0], "prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": seed,
            "emphasis": 1.1, **SAMPLING, **knobs}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["refine", 0]}},
    }


# -- timers ------------------------------------------------------------------------------------------------------------
class Timers:
    """Seconds per named part of the current run, from perf_counter pairs around wrapped functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._patches: list[tuple[object, str, object]] = []

    def wrap(self, owner, attribute: str, name) -> None:
        """Time ``owner.attribute`` under ``name`` (a string, or a function of the call's args giving one)."""
        original = getattr(owner, attribute)
        seconds = self.seconds

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[name(*args, **kwargs) if callable(name) else name] += time.perf_counter() - start

        self._patches.append((owner, attribute, original))
        setattr(owner, attribute, timed)

    def restore(self) -> None:
        for owner, attribute, original in reversed(self._patches):
            setattr(owner, attribute, original)
        self._patches.clear()

    def take(self) -> dict[str, float]:
        taken = dict(self.seconds)
        self.seconds.clear()
        return taken


def install_timers(timers: Timers) -> None:
    import comfy.model_management
    import comfy.sample
    import comfy.sd

    import nodes

    refiner = sys.modules[nodes.NODE_CLASS_MAPPINGS["RefineryGRefine"].__module__]  # the pack as ComfyUI loaded it
    timers.wrap(refiner, "compute_quality_maps", "maps")
    timers.wrap(refiner, "plan_refinement", "plan")
    timers.wrap(refiner, "run_stage", lambda *args, **kwargs: f"stage{args[4]}")  # run_stage(model, cond, samples, plans, stage, ...)
    timers.wrap(comfy.sample, "sample", "sampling")
    timers.wrap(comfy.sd.VAE, "encode", "vae_encode")
    timers.wrap(comfy.sd.VAE, "decode", "vae_decode")
    timers.wrap(comfy.sd.CLIP, "tokenize", "text_encode")
    timers.wrap(comfy.sd.CLIP, "encode_from_tokens_scheduled", "text_encode")
    timers.wrap(comfy.model_management, "load_models_gpu", "model_load")  # inside sampling / VAE / text encode


# -- running -----------------------------------------------------------------------------------------------------------
def run(harness: ComfyHarness, graph: dict, timers: Timers) -> tuple[float, dict[str, float], str]:
    """One graph: (wall seconds, split seconds, G-Refine summary or ""). The split also holds "cpu": the process's
    CPU seconds (all threads) for the run, less sensitive than wall time to other jobs on the machine."""
    timers.take()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = harness.run_graph(graph)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    if not result.success:
        raise RuntimeError(f"graph failed:\n{result.error_text()}")
    if not (result.did_run("sample") or result.did_run("refine")):
        raise RuntimeError("the sampler node did not run (a cached result): each repeat must execute")
    summary = "".join(result.outputs.get("refine", {}).get("text", []))
    return seconds, {**timers.take(), "cpu": cpu}, summary


def parse_summary(summary: str) -> tuple[float, float, int, int]:
    """(stage-1 strength, % of pixels stage 1 re-denoised, stage-1 steps, stage-2 steps) from a one-image plan."""
    first = re.search(r"stage 1: strength ([\d.]+), (\d+) steps on ([\d.]+)% of the pixels", summary)
    second = re.search(r"stage 2: strength [\d.]+, (\d+) steps", summary)
    if first is None or second is None:
        raise RuntimeError(f"G-Refine did not run both stages (mask empty or gated?); summary:\n{summary}\n"
                           "Lower --threshold.")
    return float(first.group(1)), float(first.group(3)), int(first.group(2)), int(second.group(1))


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="picture side in pixels (multiple of 8)")
    parser.add_argument("--steps", type=int, default=20, help="total sampler steps of each arm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=2, help="total steps of the (untimed) warm-up runs")
    parser.add_argument("--threshold", type=float, default=0.5, help="G-Refine mask threshold on 1-P+A")
    parser.add_argument("--denoise", type=float, default=None,
                        help="plain KSampler denoise (default: the refiner's stage-1 strength in the warm-up)")
    parser.add_argument("--workdir", type=Path, default=None, help="ComfyUI base folder (default: a temp folder)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch results/ and RESULTS.md")
    args = parser.parse_args(argv)
    if args.size % 8:
        parser.error("--size must be a multiple of 8")
    cores = limit_threads()
    comfyui_dir = find_comfyui(PACK_ROOT)
    if comfyui_dir is None:
        sys.exit("ComfyUI not found: set COMFYUI_DIR to a ComfyUI 0.8 root (main.py and comfy/).")

    base = args.workdir or Path(tempfile.mkdtemp(prefix="refiner-overhead-"))
    harness = ComfyHarness(comfyui_dir, base, PACK_ROOT)
    quality_clip = build_quality_clip(harness.models_dir / "quality_clip")
    pictures = [f"bench_{args.size}_{index}.png" for index in range(args.repeats + 1)]  # [0] is the warm-up's
    for index, name in enumerate(pictures):
        write_picture(harness.input_dir / name, args.size, seed=index)
    harness.start()
    torch.set_num_threads(cores)  # ComfyUI's start-up may change it
    if harness.pack_import_failures():
        sys.exit(f"the pack failed to load: {harness.pack_import_failures()}")

    import folder_paths
    from sd15_checkpoint import install_sd15

    models = install_sd15(harness.models_dir)  # as conftest's sd15_models fixture
    for folder_key, sub in (("diffusion_models", "unet"), ("text_encoders", "text_encoders"), ("vae", "vae")):
        folder_paths.add_model_folder_path(folder_key, str(harness.models_dir / sub), is_default=True)

    timers = Timers()
    install_timers(timers)
    load_before = os.getloadavg()[0]
    try:
        # warm-up: loads every model, fills the quality tower's text cache; the plain denoise follows the refiner
        shared = shared_nodes(models, quality_clip, pictures[0])
        warm_refiner, _, summary = run(harness, refiner_graph(shared, SEED_BASE, args.warmup_steps, args.threshold),
                                       timers)
        strength, *_ = parse_summary(summary)
        denoise = args.denoise if args.denoise is not None else round(strength, 3)
        warm_plain, _, _ = run(harness, plain_graph(shared, SEED_BASE, args.warmup_steps, denoise), timers)
        print(f"warm-up: refiner {warm_refiner:.1f} s (with model loads), plain {warm_plain:.1f} s; "
              f"plain denoise {denoise}", flush=True)

        refiner_runs, plain_runs, shares, strengths = [], [], [], []
        for repeat in range(1, args.repeats + 1):
            seed = SEED_BASE + repeat
            shared = shared_nodes(models, quality_clip, pictures[repeat])
            arms = [("refiner", refiner_graph(shared, seed, args.steps, args.threshold)),
                    ("plain", plain_graph(shared, seed, args.steps, denoise))]
            for arm, graph in arms if repeat % 2 else arms[::-1]:  # A,B then B,A: a load drift hits both arms alike
                if arm == "refiner":
                    seconds, split, summary = run(harness, graph, timers)
                    strength, share, stage1_steps, stage2_steps = parse_summary(summary)
                else:
                    plain_seconds, plain_split, _ = run(harness, graph, timers)
            refiner_runs.append((seconds, split))
            plain_runs.append((plain_seconds, plain_split))
            shares.append(share)
            strengths.append(strength)
            print(f"repeat {repeat}: refiner {seconds:.1f} s, plain {plain_seconds:.1f} s "
                  f"(ratio {seconds / plain_seconds:.3f}); stage 1 on {share:.1f}% at strength {strength:.3f}; "
                  f"refiner split {format_split(split)}; plain split {format_split(plain_split)}", flush=True)
    finally:
        timers.restore()

    def median_part(runs, name: str) -> float:
        return statistics.median(split.get(name, 0.0) for _, split in runs)

    refiner_seconds = statistics.median(seconds for seconds, _ in refiner_runs)
    plain_seconds = statistics.median(seconds for seconds, _ in plain_runs)
    numbers = {
        "ratio": refiner_seconds / plain_seconds,
        "ratio_pairs_median": statistics.median(r / p for (r, _), (p, _) in zip(refiner_runs, plain_runs)),
        "refiner_seconds": refiner_seconds,
        "plain_seconds": plain_seconds,
        "overhead_seconds": refiner_seconds - plain_seconds,
        "cpu_ratio": median_part(refiner_runs, "cpu") / median_part(plain_runs, "cpu"),
        "refiner_cpu_seconds": median_part(refiner_runs, "cpu"),
        "plain_cpu_seconds": median_part(plain_runs, "cpu"),
        "refiner_model_load_seconds": median_part(refiner_runs, "model_load"),
        "plain_model_load_seconds": median_part(plain_runs, "model_load"),
        "refiner_seconds_max": max(seconds for seconds, _ in refiner_runs),
        "plain_seconds_max": max(seconds for seconds, _ in plain_runs),
        "maps_seconds": median_part(refiner_runs, "maps"),
        "plan_seconds": median_part(refiner_runs, "plan"),
        "refiner_text_encode_seconds": median_part(refiner_runs, "text_encode"),
        "plain_text_encode_seconds": median_part(plain_runs, "text_encode"),
        "refiner_sampling_seconds": median_part(refiner_runs, "sampling"),
        "plain_sampling_seconds": median_part(plain_runs, "sampling"),
        "stage1_seconds": median_part(refiner_runs, "stage1"),
        "stage2_seconds": median_part(refiner_runs, "stage2"),
        "refiner_vae_seconds": median_part(refiner_runs, "vae_encode") + median_part(refiner_runs, "vae_decode"),
        "plain_vae_seconds": median_part(plain_runs, "vae_encode") + median_part(plain_runs, "vae_decode"),
        "stage1_mask_percent": statistics.median(shares),
        "stage1_strength": statistics.median(strengths),
        "plain_denoise": denoise,
        "stage1_steps": float(stage1_steps),
        "stage2_steps": float(stage2_steps),
        "refiner_seconds_per_step": median_part(refiner_runs, "sampling") / args.steps,
        "plain_seconds_per_step": median_part(plain_runs, "sampling") / args.steps,
        "steps": float(args.steps),
        "size": float(args.size),
        "repeats": float(args.repeats),
        "threads": float(cores),
        "cfg": SAMPLING["cfg"],
        "load_average_start": load_before,
        "load_average_end": os.getloadavg()[0],
    }
    # what is neither sampling, VAE, text encoding nor maps: graph validation, LoadImage, preview PNG, plan, masks...
    numbers["refiner_other_seconds"] = refiner_seconds - sum(numbers[key] for key in (
        "maps_seconds", "refiner_text_encode_seconds", "refiner_sampling_seconds", "refiner_vae_seconds"))
    numbers["plain_other_seconds"] = plain_seconds - sum(numbers[key] for key in (
        "plain_text_encode_seconds", "plain_sampling_seconds", "plain_vae_seconds"))
    summary = (
        f"G-Refine {refiner_seconds:.1f} s vs plain KSampler img2img {plain_seconds:.1f} s, ratio "
        f"{with_target(numbers['ratio'], '<=', 1.10)} (median of pair ratios {numbers['ratio_pairs_median']:.3f}; CPU-time ratio "
        f"{numbers['cpu_ratio']:.3f}); {args.size}x{args.size}, {args.steps} steps ({stage1_steps}+{stage2_steps}), euler/normal, "
        f"cfg {SAMPLING['cfg']:g}, random SD1.5 + random ViT-B-16 quality CLIP, stage 1 on "
        f"{numbers['stage1_mask_percent']:.0f}% of the pixels at strength {numbers['stage1_strength']:.2f} (plain "
        f"denoise {denoise:g}); split: maps {numbers['maps_seconds']:.2f} s, text encode "
        f"{numbers['refiner_text_encode_seconds']:.2f} s (plain: cached), sampling {numbers['refiner_sampling_seconds']:.1f}"
        f" vs {numbers['plain_sampling_seconds']:.1f} s, VAE {numbers['refiner_vae_seconds']:.1f} vs "
        f"{numbers['plain_vae_seconds']:.1f} s; median of {args.repeats}, interleaved, {cores} threads, CPU, "
        f"load {load_before:.1f}-{numbers['load_average_end']:.1f}"
    )
    return report("refiner_overhead", numbers, summary, argv, write=not args.no_write)


def format_split(split: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.2f}" for name, seconds in sorted(split.items()))


if __name__ == "__main__":
    main()
