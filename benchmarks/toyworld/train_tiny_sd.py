"""Train the toy world's tiny Stable-Diffusion pipeline (v2) on scenes and captions, resumable, deterministic.

Three stages, each its own command so that the long ones can run (and be stopped and resumed) in the background:

- ``--stage vae``: the ``AutoencoderKL`` (``sd_pipeline.VAE_V2``: 8 latent channels at 16x16) on scenes of every
  background, two thirds of them with injected defects (the refiner round-trips defective pictures), MSE + L1 + a
  small KL, cosine learning rate; at the end ``scaling_factor`` = 1 / std of the latents.
- ``--stage unet``: the UNet (``sd_pipeline.UNET_V2``) on clean scenes, conditioned on toy-clip's text tower,
  converted to a transformers ``CLIPTextModel`` and *frozen* (``text_encoder.py``), as real Stable Diffusion
  conditions on a pretrained CLIP; it never sees a held-out caption (``scenes.held_out_caption``, one in ten, which
  the benchmarks ask for); epsilon objective with min-SNR-5 weighting, 10 % of the captions dropped to ""
  (classifier-free guidance), an EMA of the weights (what ships). Every ``--snapshot-every`` steps the EMA UNet is
  saved beside the checkpoint (the learning curve: ``benchmarks/toyworld_models.py --unet-snapshot``).
- ``--stage export``: VAE + EMA UNet + text encoder + tokenizer + DDIM scheduler as a ``StableDiffusionPipeline``
  folder, written to a temporary folder that then replaces ``--output`` (a crash never leaves half a pipeline).

Checkpoints (``<work-dir>/vae.pt``, ``unet.pt``) are written every ``--checkpoint-minutes``; the same command
continues where it stopped (``--resume-from auto``) and ends with the same weights as an uninterrupted run (the
batches depend on the step number only, and the noise generator's state is checkpointed).

Run (v2, as shipped; see benchmarks/RESULTS.md for the times):
  python -m comfyui_refinery.benchmarks.toyworld.train_tiny_sd --stage vae --work-dir toyworld-runs
  python -m comfyui_refinery.benchmarks.toyworld.train_tiny_sd --stage unet --work-dir toyworld-runs
  python -m comfyui_refinery.benchmarks.toyworld.train_tiny_sd --stage export --work-dir toyworld-runs
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import defects, scenes
from .data import TOY_CLIP_CHECKPOINT, TOY_SD_FOLDER
from .resumable import RESUME_CHOICES, PeriodicSaver, checkpoint_path, load_state, save_state
from .sd_pipeline import RESOLUTION, SCHEDULER_CONFIG

EVAL_SEED_OFFSET = 3 * 10**9
VAE_SEED_OFFSET = 4 * 10**9
UNET_SEED_OFFSET = 5 * 10**9
VAE_EVAL_SEED_OFFSET = 6 * 10**9
CAPTION_DROP = 0.1
MIN_SNR_GAMMA = 5.0


def to_model_range(pictures: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) pictures -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def scene_batch(seeds: range) -> tuple[torch.Tensor, list[str]]:
    """Clean pictures (B, 3, 64, 64) in [-1, 1] and their captions."""
    pictures, captions = [], []
    for seed in seeds:
        image, text, _ = scenes.generate(seed, RESOLUTION)
        pictures.append(image)
        captions.append(text)
    return to_model_range(pictures), captions


def training_batch(step: int, size: int, offset: int) -> tuple[torch.Tensor, list[str]]:
    """The UNet's batch for ``step``: the first ``size`` scenes of seeds ``offset + 4 * size * step + j`` whose
    captions are not held out (``scenes.held_out_caption``), so the generator never sees a held-out caption."""
    pictures, captions = [], []
    for seed in range(offset + 4 * size * step, offset + 4 * size * (step + 1)):
        image, text, _ = scenes.generate(seed, RESOLUTION)
        if not scenes.held_out_caption(text):
            pictures.append(image)
            captions.append(text)
            if len(pictures) == size:
                return to_model_range(pictures), captions
    raise RuntimeError(f"step {step}: fewer than {size} training captions in {4 * size} scenes")


def vae_batch(seeds: range) -> torch.Tensor:
    """Pictures (B, 3, 64, 64) in [-1, 1], each with 0-2 injected defects of any kind (``defects.make_example``)."""
    return to_model_range([defects.make_example(seed, RESOLUTION)[0] for seed in seeds])


# ------------------------------------------------------------------------------------------------ VAE
def train_vae(args) -> None:
    from .sd_pipeline import build_vae_v2

    vae = build_vae_v2(args.seed).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0)
    warmup = 100

    def learning_rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.vae_steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)
    generator = torch.Generator().manual_seed(args.seed)
    state_path = checkpoint_path(args.work_dir, "vae")
    saved = load_state(state_path, args.resume_from)
    first_step, losses, seconds_before, done = 0, [], 0.0, False
    if saved is not None:
        vae.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        generator.set_state(saved["generator"])
        first_step, losses, seconds_before = saved["step"], list(saved["losses"]), saved["seconds"]
        done = saved.get("done", False)
        print(f"tiny-sd vae: resumed from {state_path} at step {first_step}")
    start = time.time()

    def save(step: int, finished: bool = False) -> None:
        save_state(state_path, {"model": vae.state_dict(), "optimizer": optimizer.state_dict(),
                                "schedule": schedule.state_dict(), "generator": generator.get_state(),
                                "step": step, "losses": losses, "seconds": seconds_before + time.time() - start,
                                "done": finished, "scaling_factor": vae.config.scaling_factor})

    if done:
        print(f"tiny-sd vae: already trained ({first_step} steps) in {state_path}")
        return
    last = args.vae_steps if args.stop_after is None else min(args.vae_steps, args.stop_after)
    step = first_step
    saver = PeriodicSaver(60 * args.checkpoint_minutes, lambda: save(step + 1))
    offset = VAE_SEED_OFFSET + args.seed * 10**7
    for step in tqdm(range(first_step, last), desc="tiny-sd vae", initial=first_step, total=args.vae_steps):
        pictures = vae_batch(range(offset + step * args.vae_batch_size, offset + (step + 1) * args.vae_batch_size))
        posterior = vae.encode(pictures).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, pictures) + 0.5 * F.l1_loss(reconstruction, pictures)
        loss = loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        saver.tick()
    if last < args.vae_steps:
        save(last)
        print(f"tiny-sd vae: stopped at step {last} of {args.vae_steps}; rerun the same command to continue")
        return
    vae.eval()
    with torch.no_grad():
        pictures, _ = scene_batch(range(10**8, 10**8 + 256))
        latents = vae.encode(pictures).latent_dist.sample(torch.Generator().manual_seed(args.seed))
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    save(args.vae_steps, finished=True)
    print(f"tiny-sd vae: trained, final loss {np.mean(losses[-100:]):.5f}, scaling factor "
          f"{vae.config.scaling_factor:.4f}")


def load_trained_vae(work_dir: Path):
    """The VAE of a finished ``--stage vae`` run (eval mode, frozen), with its scaling factor."""
    from .sd_pipeline import build_vae_v2

    saved = load_state(checkpoint_path(work_dir, "vae"), "auto")
    if saved is None or not saved.get("done"):
        raise SystemExit(f"No finished VAE in {work_dir}: run --stage vae first (or let it finish).")
    vae = build_vae_v2(0)
    vae.load_state_dict(saved["model"])
    vae.register_to_config(scaling_factor=float(saved["scaling_factor"]))
    return vae.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ UNet
def encode_prompts(text_encoder, tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, context, width) final-LayerNorm hidden states, as ``StableDiffusionPipeline`` conditions."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction, min(SNR, gamma) / SNR (Hang et al. 2023): (B,)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    return torch.clamp(snr, max=gamma) / snr


def train_unet(args) -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from .sd_pipeline import build_unet_v2
    from .text_encoder import build_tokenizer, load_text_encoder

    vae = load_trained_vae(args.work_dir)
    text_encoder = load_text_encoder(args.text_encoder_from).requires_grad_(False)
    tokenizer = build_tokenizer(args.work_dir / "tokenizer_files", args.text_encoder_from)
    unet = build_unet_v2(args.seed, text_encoder.config.hidden_size).train()
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 200))
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    generator = torch.Generator().manual_seed(args.seed)
    state_path = checkpoint_path(args.work_dir, "unet")
    saved = load_state(state_path, args.resume_from)
    first_step, losses, seconds_before = 0, [], 0.0
    if saved is not None:
        unet.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        ema.load_state_dict(saved["ema"])
        generator.set_state(saved["generator"])
        first_step, losses, seconds_before = saved["step"], list(saved["losses"]), saved["seconds"]
        print(f"tiny-sd unet: resumed from {state_path} at step {first_step}")
    start = time.time()

    def save(step: int) -> None:
        save_state(state_path, {"model": unet.state_dict(), "optimizer": optimizer.state_dict(),
                                "schedule": schedule.state_dict(), "ema": ema.state_dict(),
                                "generator": generator.get_state(), "step": step, "losses": losses,
                                "seconds": seconds_before + time.time() - start,
                                "scaling_factor": vae.config.scaling_factor})

    scaling = vae.config.scaling_factor
    with torch.no_grad():
        empty = encode_prompts(text_encoder, tokenizer, [""])  # (1, context, width)
    last = args.unet_steps if args.stop_after is None else min(args.unet_steps, args.stop_after)
    step = first_step
    saver = PeriodicSaver(60 * args.checkpoint_minutes, lambda: save(step + 1))
    offset = UNET_SEED_OFFSET + args.seed * 10**8
    size = args.batch_size
    for step in tqdm(range(first_step, last), desc="tiny-sd unet", initial=first_step, total=args.unet_steps):
        pictures, captions = training_batch(step, size, offset)
        with torch.no_grad():
            latents = vae.encode(pictures).latent_dist.sample(generator) * scaling  # (B, 8, 16, 16)
            dropped = torch.rand(size, generator=generator) < CAPTION_DROP
            context = encode_prompts(text_encoder, tokenizer, captions)
            context = torch.where(dropped[:, None, None], empty.expand_as(context), context)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (size,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, context).sample
        per_example = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_example * min_snr_weights(noise_scheduler, timesteps)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        if (step + 1) % args.snapshot_every == 0:
            save_ema_unet(unet, ema, args.work_dir / "snapshots" / f"unet-ema-{step + 1:06d}")
            save(step + 1)
        saver.tick()
    save(last)
    if last < args.unet_steps:
        print(f"tiny-sd unet: stopped at step {last} of {args.unet_steps}; rerun the same command to continue")
        return
    save_ema_unet(unet, ema, args.work_dir / "snapshots" / f"unet-ema-{args.unet_steps:06d}")
    print(f"tiny-sd unet: trained {args.unet_steps} steps, final loss {np.mean(losses[-200:]):.5f}")


def save_ema_unet(unet, ema, folder: Path) -> None:
    """The EMA weights as a diffusers UNet folder (the live weights are put back afterwards)."""
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    unet.save_pretrained(str(temporary))
    shutil.rmtree(folder, ignore_errors=True)
    temporary.rename(folder)
    ema.restore(unet.parameters())


# ------------------------------------------------------------------------------------------------ export
def export_pipeline(args) -> dict:
    from diffusers import UNet2DConditionModel

    from .sd_pipeline import assemble_pipeline
    from .text_encoder import build_tokenizer, load_text_encoder

    saved = load_state(checkpoint_path(args.work_dir, "unet"), "auto")
    if saved is None:
        raise SystemExit(f"No UNet checkpoint in {args.work_dir}: run --stage unet first.")
    snapshot = args.unet_snapshot or args.work_dir / "snapshots" / f"unet-ema-{saved['step']:06d}"
    if not (snapshot / "config.json").is_file():
        raise SystemExit(f"No EMA UNet snapshot at {snapshot}.")
    vae = load_trained_vae(args.work_dir)
    unet = UNet2DConditionModel.from_pretrained(str(snapshot)).eval()
    text_encoder = load_text_encoder(args.text_encoder_from)
    temporary = args.output.with_name(args.output.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    tokenizer = build_tokenizer(temporary / "tokenizer_files", args.text_encoder_from)
    pipeline = assemble_pipeline(vae, unet, text_encoder, tokenizer)
    vae_state = load_state(checkpoint_path(args.work_dir, "vae"), "auto")
    metrics = {
        "vae_steps": float(vae_state["step"]),
        "vae_seconds": float(vae_state["seconds"]),
        "vae_final_loss": float(np.mean(vae_state["losses"][-100:])),
        "unet_steps": float(int(snapshot.name.rsplit("-", 1)[-1])),
        "unet_seconds": float(saved["seconds"]),
        "unet_final_loss": float(np.mean(saved["losses"][-200:])),
        "batch_size": float(args.batch_size),
        "scaling_factor": float(vae.config.scaling_factor),
        "text_encoder": "toy-clip text tower (frozen)",
    }
    shutil.rmtree(temporary / "tokenizer_files", ignore_errors=True)
    pipeline.text_encoder.half()  # halves the largest file (the 49408-token embedding); loads back as float32
    pipeline.save_pretrained(str(temporary))
    (temporary / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(args.output, ignore_errors=True)
    temporary.rename(args.output)
    print(json.dumps(metrics, indent=2))
    return metrics


def classify_object(picture: np.ndarray, background: tuple[int, int, int]) -> tuple[str | None, str | None]:
    """(colour, shape) of the single object on a plain background in ``picture`` (H, W, 3) uint8: the majority
    palette colour of the pixels far from the background tone, and the shape template (at the object's centroid,
    either size) with the best IoU. (None, None) when no object pixels are found."""
    distance = np.abs(picture.astype(int) - np.array(background)).sum(axis=-1)
    pixels = distance > 90
    if pixels.sum() < 4:
        return None, None
    palette = np.array(list(scenes.COLOURS.values()))  # (6, 3)
    nearest = np.abs(picture[pixels][:, None, :].astype(int) - palette[None]).sum(axis=-1).argmin(axis=1)
    colour = list(scenes.COLOURS)[int(np.bincount(nearest, minlength=len(palette)).argmax())]
    ys, xs = np.nonzero(pixels)
    centre = (float(xs.mean()), float(ys.mean()))
    best, shape = -1.0, None
    for candidate in scenes.SHAPES:
        for fraction in scenes.SIZES.values():
            template = scenes.shape_mask(candidate, centre, fraction * RESOLUTION, RESOLUTION)
            iou = (template & pixels).sum() / max(1, (template | pixels).sum())
            if iou > best:
                best, shape = iou, candidate
    return colour, shape


@torch.no_grad()
def steering_accuracy(pipeline, count: int = 60, steps: int = 20, guidance: float = 4.0, seed: int = 0) -> dict:
    """Generate ``count`` single-object, plain-background held-out captions; fraction whose picture shows the
    caption's colour and shape (chance 1/6 and 1/4)."""
    rng = np.random.default_rng(EVAL_SEED_OFFSET)
    captions, expected = [], []
    while len(captions) < count:
        scene = scenes.sample_scene(rng, RESOLUTION, max_groups=1)
        if scene.background == "plain" and scene.objects[0].count == 1:
            captions.append(scenes.caption(scene))
            expected.append((scene.objects[0].colour, scene.objects[0].shape, scene.background_colour))
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(captions, num_inference_steps=steps, guidance_scale=guidance, height=RESOLUTION,
                      width=RESOLUTION, generator=torch.Generator().manual_seed(seed), output_type="np").images
    colour_hits = shape_hits = 0
    for image, (colour, shape, background) in zip(images, expected):
        found_colour, found_shape = classify_object((image * 255).round().astype(np.uint8),
                                                    scenes.BACKGROUND_COLOURS[background][0])
        colour_hits += int(found_colour == colour)
        shape_hits += int(found_shape == shape)
    return {"colour_accuracy": colour_hits / count, "shape_accuracy": shape_hits / count,
            "colour_chance": 1 / len(scenes.COLOURS), "shape_chance": 1 / len(scenes.SHAPES),
            "eval_captions": float(count)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the toy world's tiny Stable-Diffusion pipeline (v2).")
    parser.add_argument("--stage", choices=("vae", "unet", "export"), required=True)
    parser.add_argument("--work-dir", type=Path, default=Path("toyworld-runs"),
                        help="checkpoints (vae.pt, unet.pt) and the EMA UNet snapshots")
    parser.add_argument("--resume-from", choices=RESUME_CHOICES, default="auto",
                        help="auto: continue from the stage's checkpoint in --work-dir when there is one")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop (with a checkpoint) after this many steps of the stage in all; rerun to continue")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--vae-learning-rate", type=float, default=1e-3)
    parser.add_argument("--unet-steps", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--snapshot-every", type=int, default=2000)
    parser.add_argument("--text-encoder-from", type=Path, default=TOY_CLIP_CHECKPOINT,
                        help="toy-clip checkpoint whose (frozen) text tower conditions the UNet")
    parser.add_argument("--unet-snapshot", type=Path, default=None,
                        help="with --stage export: this EMA snapshot instead of the last one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=TOY_SD_FOLDER)
    args = parser.parse_args(argv)
    if min(args.vae_steps, args.unet_steps, args.batch_size, args.vae_batch_size, args.snapshot_every) < 1:
        parser.error("steps, batch sizes and --snapshot-every must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    {"vae": train_vae, "unet": train_unet, "export": export_pipeline}[args.stage](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
