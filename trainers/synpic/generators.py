"""The k generators of Syn-Pic as diffusers pipelines: load (offline), swap the scheduler, fuse a LoRA, and draw
pictures whose noise depends only on (base seed, generator seed, prompt index)."""

from __future__ import annotations

import torch

from ..common.accelerate_setup import seed_for_step
from ..common.lora import load_lora_into_pipeline
from ..common.model_loading import load_sd_pipeline
from .config import GeneratorSpec

GENERATOR_STREAM = 1000  # seed_for_step stream = GENERATOR_STREAM + the generator's seed


def picture_seed(base_seed: int, generator_seed: int, prompt_index: int) -> int:
    """The seed of the noise of (prompt ``prompt_index``, a generator with seed ``generator_seed``)."""
    return seed_for_step(base_seed, prompt_index, GENERATOR_STREAM + generator_seed)


def load_generator(spec: GeneratorSpec, device: torch.device, dtype: torch.dtype):
    """The pipeline of ``spec`` on ``device``: the model (``load_sd_pipeline``), its scheduler replaced by
    ``spec.scheduler`` (built from the model's scheduler config) and ``spec.lora`` fused at ``spec.lora_scale``
    (diffusers' ``load_lora_weights`` reads the kohya/ComfyUI files ``core/lora_export.py`` writes)."""
    import diffusers

    pipeline = load_sd_pipeline(spec.model, dtype=dtype)
    if spec.scheduler is not None:
        pipeline.scheduler = getattr(diffusers, spec.scheduler).from_config(pipeline.scheduler.config)
    if spec.lora is not None:
        load_lora_into_pipeline(pipeline, spec.lora, "synpic")
        pipeline.fuse_lora(lora_scale=spec.lora_scale, adapter_names=["synpic"])
        pipeline.unload_lora_weights()  # the fused weights stay; the adapter layers go
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def native_size(pipeline) -> tuple[int, int]:
    """(height, width) the model was trained at: UNet sample size x VAE scale factor."""
    side = int(pipeline.unet.config.sample_size * pipeline.vae_scale_factor)
    return side, side


@torch.no_grad()
def draw(pipeline, prompts: list[str], seeds: list[int], *, steps: int, guidance_scale: float, height: int,
         width: int, negative_prompt: str = "") -> torch.Tensor:
    """One picture per prompt, prompt i from a CPU generator seeded ``seeds[i]``: (B, H, W, 3) float in [0, 1] on
    the CPU."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    images = pipeline(prompts, negative_prompt=[negative_prompt] * len(prompts), num_inference_steps=steps,
                      guidance_scale=guidance_scale, height=height, width=width, generator=generators,
                      output_type="pt").images  # (B, 3, H, W) in [0, 1]
    return images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu()
