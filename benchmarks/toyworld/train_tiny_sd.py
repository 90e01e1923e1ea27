"""Train the toy world's tiny Stable-Diffusion pipeline on scenes and captions, deterministic from a seed.

Stage 1 trains the VAE (MSE + L1 + a small KL) and sets its ``scaling_factor`` to 1 / std of the latents; stage 2
trains the UNet and the text encoder with the standard epsilon objective on a DDPM schedule, with 10 % of the
captions dropped to "" so classifier-free guidance works. The pipeline is saved with ``save_pretrained`` into a
temporary folder that then replaces ``models/tiny-sd`` (so a crash never leaves half a pipeline), with the
training metrics in ``training_metrics.json``: how often a generated picture shows the caption's colour and
shape, against chance.

Run: python -m comfyui_refinery.benchmarks.toyworld.train_tiny_sd [--vae-steps 800] [--unet-steps 3000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import scenes
from .data import TOY_SD_FOLDER
from .sd_pipeline import CONTEXT_LENGTH, RESOLUTION, SCHEDULER_CONFIG, build_pipeline

EVAL_SEED_OFFSET = 3 * 10**9


def scene_batch(seeds: range) -> tuple[torch.Tensor, list[str]]:
    """Pictures (B, 3, 64, 64) in [-1, 1] and their captions."""
    pictures, captions = [], []
    for seed in seeds:
        image, text, _ = scenes.generate(seed, RESOLUTION)
        pictures.append(image)
        captions.append(text)
    batch = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return batch, captions


def train_vae(vae, steps: int, batch_size: int, seed: int, learning_rate: float) -> float:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
    losses = []
    for step in tqdm(range(steps), desc="tiny-sd vae"):
        pictures, _ = scene_batch(range((seed * 10**7) + step * batch_size, (seed * 10**7) + (step + 1) * batch_size))
        posterior = vae.encode(pictures).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, pictures) + 0.5 * F.l1_loss(reconstruction, pictures)
        loss = loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses[-50:]))


def encode_prompts(pipeline, captions: list[str]) -> torch.Tensor:
    ids = pipeline.tokenizer(captions, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                             return_tensors="pt").input_ids
    return pipeline.text_encoder(ids)[0]  # (B, 77, 64)


def train_denoiser(pipeline, steps: int, batch_size: int, seed: int, learning_rate: float) -> float:
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    parameters = list(pipeline.unet.parameters()) + list(pipeline.text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    generator = torch.Generator().manual_seed(seed)
    scaling = pipeline.vae.config.scaling_factor
    losses = []
    offset = seed * 10**7 + 5 * 10**6
    for step in tqdm(range(steps), desc="tiny-sd unet"):
        pictures, captions = scene_batch(range(offset + step * batch_size, offset + (step + 1) * batch_size))
        dropped = torch.rand(batch_size, generator=generator) < 0.1
        captions = ["" if drop else text for drop, text in zip(dropped.tolist(), captions)]
        with torch.no_grad():
            latents = pipeline.vae.encode(pictures).latent_dist.sample(generator) * scaling  # (B, 4, 16, 16)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = pipeline.unet(noisy, timesteps, encode_prompts(pipeline, captions)).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return float(np.mean(losses[-100:]))


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
    parser = argparse.ArgumentParser(description="Train the toy world's tiny Stable-Diffusion pipeline.")
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vae-learning-rate", type=float, default=1e-3)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=TOY_SD_FOLDER)
    parser.add_argument("--resume-from", type=Path, default=None,
                        help="continue training the UNet and text encoder of a saved pipeline (its VAE is kept; "
                        "new scenes are drawn with --seed)")
    parser.add_argument("--previous-unet-steps", type=int, default=0,
                        help="with --resume-from: UNet steps already done, for the metrics")
    args = parser.parse_args(argv)
    if min(args.vae_steps, args.unet_steps, args.batch_size, args.vae_batch_size) < 1:
        parser.error("steps and batch sizes must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    temporary = args.output.with_name(args.output.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    if args.resume_from is not None:
        from .sd_pipeline import load_pipeline

        pipeline = load_pipeline(args.resume_from)
        pipeline.vae.eval().requires_grad_(False)
        vae_loss = None  # the VAE is kept as it was
    else:
        pipeline = build_pipeline(args.seed, temporary / "tokenizer_files")
        pipeline.vae.train()
        vae_loss = train_vae(pipeline.vae, args.vae_steps, args.vae_batch_size, args.seed, args.vae_learning_rate)
        pipeline.vae.eval().requires_grad_(False)
        with torch.no_grad():
            pictures, _ = scene_batch(range(10**8, 10**8 + 256))
            latents = pipeline.vae.encode(pictures).latent_dist.sample(torch.Generator().manual_seed(args.seed))
        pipeline.vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae_seconds = time.time() - start
    pipeline.unet.train()
    pipeline.text_encoder.train()
    unet_loss = train_denoiser(pipeline, args.unet_steps, args.batch_size, args.seed, args.learning_rate)
    pipeline.unet.eval()
    pipeline.text_encoder.eval()
    metrics = {
        "training_seconds": time.time() - start,
        "vae_seconds": vae_seconds,
        "vae_steps": float(args.vae_steps),
        "unet_steps": float(args.unet_steps + args.previous_unet_steps),
        "resumed_from_steps": float(args.previous_unet_steps),
        "batch_size": float(args.batch_size),
        "unet_final_loss": unet_loss,
        "scaling_factor": pipeline.vae.config.scaling_factor,
        **steering_accuracy(pipeline),
    }
    if vae_loss is not None:
        metrics["vae_final_loss"] = vae_loss
    shutil.rmtree(temporary / "tokenizer_files", ignore_errors=True)
    pipeline.text_encoder.half()  # halves the largest file (the 49408-token embedding); loads back as float32
    pipeline.save_pretrained(str(temporary))
    (temporary / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(args.output, ignore_errors=True)
    temporary.rename(args.output)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
