"""The toy world's tiny Stable-Diffusion pipeline, built from diffusers' and transformers' own classes.

Same classes and code paths as SD1.5 (``StableDiffusionPipeline`` and its img2img / inpaint variants), only
small: 64x64 pictures, a 4x VAE (16x16x4 latents), a two-level UNet with cross-attention, and a 2-layer CLIP text
encoder whose tokenizer is CLIP's own BPE, rebuilt offline from the file open_clip ships.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from .data import TOY_SD_FOLDER

RESOLUTION = 64
CONTEXT_LENGTH = 77
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def write_clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of CLIP's BPE tokenizer, derived from ``open_clip.tokenizer.default_bpe()``
    exactly as CLIP builds its vocabulary (byte tokens, byte+"</w>" tokens, merges, then the two special tokens)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [token + "</w>" for token in vocab]
    vocab += ["".join(merge) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({token: index for index, token in enumerate(vocab)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(merge) for merge in merges) + "\n")
    return vocab_file, merges_file


def build_tokenizer(folder: Path, context_length: int = CONTEXT_LENGTH):
    """A transformers ``CLIPTokenizer`` equal to CLIP's ("a red circle" -> 49406, 320, 736, 7117, 49407), padding
    to ``context_length`` with the end-of-text token."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_tokenizer_files(folder)
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=context_length,
                         pad_token="<|endoftext|>")


def build_pipeline(seed: int, tokenizer_folder: Path):
    """A randomly initialised tiny ``StableDiffusionPipeline`` (deterministic from ``seed``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=CONTEXT_LENGTH, projection_dim=64,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), norm_num_groups=8,
    )
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer(tokenizer_folder), unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


VAE_V2 = dict(
    in_channels=3, out_channels=3, latent_channels=8, sample_size=RESOLUTION, layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64), norm_num_groups=16,
)
"""tiny-sd v2's VAE: 4x down-sampling to (8, 16, 16) latents (v1: 4 channels and half the width)."""
UNET_V2 = dict(
    sample_size=RESOLUTION // 4, in_channels=8, out_channels=8, layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128, 128), attention_head_dim=32, norm_num_groups=32,
)
"""tiny-sd v2's UNet (5.8 M parameters): three levels (16, 8, 4 latent px), cross-attention at the first two and
in the middle block; ``cross_attention_dim`` is the text tower's width."""


def build_vae_v2(seed: int):
    """A randomly initialised v2 ``AutoencoderKL`` (deterministic from ``seed``)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_V2)


def build_unet_v2(seed: int, cross_attention_dim: int):
    """A randomly initialised v2 ``UNet2DConditionModel`` (deterministic from ``seed``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_V2, cross_attention_dim=cross_attention_dim)


def assemble_pipeline(vae, unet, text_encoder, tokenizer):
    """A ``StableDiffusionPipeline`` of the given parts with the toy world's DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def load_pipeline(folder: Path = TOY_SD_FOLDER, pipeline_class=None, dtype: torch.dtype = torch.float32):
    """Load the committed tiny pipeline (offline) as ``pipeline_class`` (default ``StableDiffusionPipeline``;
    ``StableDiffusionImg2ImgPipeline`` and ``StableDiffusionInpaintPipeline`` load from the same folder)."""
    from diffusers import StableDiffusionPipeline

    pipeline_class = pipeline_class or StableDiffusionPipeline
    if not (Path(folder) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No tiny Stable-Diffusion pipeline in '{folder}': train it with "
            f"`python -m comfyui_refinery.benchmarks.toyworld.train_tiny_sd`."
        )
    return pipeline_class.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                          safety_checker=None, requires_safety_checker=False)
