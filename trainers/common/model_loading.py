"""Load the Stable-Diffusion model a user has, offline, as a diffusers pipeline: a diffusers folder, or a ComfyUI
single-file checkpoint (``models/checkpoints/*.safetensors``) of SD1.5 or SDXL.

Single files go through diffusers' ``from_single_file(path, config=<folder>, local_files_only=True)``. The folder
is assembled at run time in a cache (:func:`diffusers_config_folder`): the component configs shipped in
``configs/<family>/`` (hand-copied from the public runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0 configs) plus CLIP tokenizer files derived from the BPE table open_clip
bundles. Nothing is fetched from the Hugging Face hub.

The family is read from the state dict's key names and shapes, never from the file name (:func:`detect_family`):
SD1.x (UNet context 768, no ``label_emb``) is "sd15"; SDXL base (context 2048, ``label_emb`` with 2816 inputs, two
text encoders under ``conditioner.embedders``) is "sdxl". SD2.x, the SDXL refiner, inpainting UNets, SD3, Flux and
anything else fail with an error that says what was found.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ...core.lora_export import FAMILIES

logger = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
TOKENIZER_RECIPE = "clip-bpe-open_clip-v1"  # part of the cache key: change it when the tokenizer files change
UNET_PREFIX = "model.diffusion_model."
CONTEXT_LENGTH = 77
# diffusers pipeline class per family, and its tokenizers (folder name -> pad token)
PIPELINE_CLASSES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
TOKENIZERS = {
    "sd15": {"tokenizer": "<|endoftext|>"},
    "sdxl": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},  # SDXL's OpenCLIP-G tokenizer pads with "!" (id 0)
}
_SD15_TEXT_KEYS = ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                   "cond_stage_model.transformer.embeddings.token_embedding.weight")
_SDXL_TEXT_KEYS = ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                   "conditioner.embedders.1.model.token_embedding.weight")


class UnsupportedModelError(ValueError):
    """The file or folder is not an SD1.5 or SDXL base model in a layout this loader reads."""


# -- family detection ------------------------------------------------------------------------------------------
def _transformer_kind(keys: Sequence[str]) -> str | None:
    """A name for a diffusion-transformer checkpoint (SD3, Flux, ...), or None."""
    for key in keys:
        stripped = key.removeprefix(UNET_PREFIX)
        if stripped.startswith("joint_blocks."):
            return "SD3 / SD3.5 (MMDiT)"
        if stripped.startswith(("double_blocks.", "single_blocks.")):
            return "Flux"
        if stripped.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            return "diffusion transformer in diffusers layout (SD3, Flux, ...)"
    return None


def family_from_shapes(shapes: Mapping[str, Sequence[int]], source: str = "the checkpoint") -> str:
    """"sd15" or "sdxl" from a single-file checkpoint's ``{key: shape}``; UnsupportedModelError otherwise, naming
    what was found (UNet context width, ``label_emb`` inputs, input channels, text encoders)."""
    keys = list(shapes)
    transformer = _transformer_kind(keys)
    if transformer:
        raise UnsupportedModelError(f"{source} is a {transformer} model: unsupported family. Only SD1.5 and SDXL "
                                    f"base checkpoints are supported.")
    unet_keys = [key for key in keys if key.startswith(UNET_PREFIX)]
    if not unet_keys:
        if any(key.startswith(("down_blocks.", "conv_in.")) for key in keys):
            layout = "a UNet alone in diffusers layout (a models/unet or models/diffusion_models file)"
        elif any(key.startswith("input_blocks.") for key in keys):
            layout = "a UNet alone in ComfyUI layout (a models/diffusion_models file)"
        else:
            layout = f"no Stable-Diffusion UNet (first keys: {keys[:3]})"
        raise UnsupportedModelError(
            f"{source} holds {layout}. Pass a full single-file checkpoint (what ComfyUI's CheckpointLoaderSimple "
            f"loads from models/checkpoints/: UNet, text encoder(s) and VAE in one file) or a diffusers folder.")
    context = [tuple(shapes[key])[1] for key in unet_keys if key.endswith("attn2.to_k.weight")]
    label = shapes.get(UNET_PREFIX + "label_emb.0.0.weight")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    found = (f"UNet context width {sorted(set(context)) or 'none'}, label_emb inputs "
             f"{tuple(label)[1] if label is not None else 'none'}, UNet input channels "
             f"{tuple(conv_in)[1] if conv_in is not None else 'unknown'}")
    if conv_in is not None and tuple(conv_in)[1] != 4:
        raise UnsupportedModelError(f"{source} has a UNet with {tuple(conv_in)[1]} input channels (an inpainting or "
                                    f"instruct model; found {found}): unsupported family. Use the base model.")
    if context and set(context) == {768} and label is None:
        family = "sd15"
        missing = [] if any(key in shapes for key in _SD15_TEXT_KEYS) else ["the CLIP-L text encoder"]
    elif context and set(context) == {2048} and label is not None and tuple(label)[1] == 2816:
        family = "sdxl"
        names = ("the CLIP-L text encoder", "the OpenCLIP-G text encoder")
        missing = [name for key, name in zip(_SDXL_TEXT_KEYS, names) if key not in shapes]
    elif context and set(context) == {1024}:
        raise UnsupportedModelError(f"{source} is a Stable Diffusion 2.x model ({found}): unsupported family. Only "
                                    f"SD1.5 (context 768) and SDXL base (context 2048) are supported.")
    elif context and set(context) == {1280} and label is not None:
        raise UnsupportedModelError(f"{source} is the SDXL refiner ({found}): unsupported family. Use SDXL base.")
    else:
        raise UnsupportedModelError(f"{source} is no SD1.5 or SDXL base model ({found}): unsupported family.")
    if missing:
        raise UnsupportedModelError(f"{source} looks like {family} ({found}) but lacks {' and '.join(missing)}: "
                                    f"a full checkpoint holds UNet, text encoder(s) and VAE.")
    return family


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` from a safetensors header, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # safetensors raises several private error types
        raise UnsupportedModelError(f"'{path}' is not a readable safetensors file ({error}).") from error


def _folder_family(folder: Path) -> str:
    """The family of a diffusers folder from model_index.json and the UNet config. A ``StableDiffusionPipeline``
    whose UNet is not SD2's (context 1024) counts as "sd15": same architecture family and LoRA format, so
    small SD1-style test pipelines load too."""
    index = json.loads((folder / "model_index.json").read_text())
    name = index.get("_class_name", "?")
    unet_config_file = folder / "unet" / "config.json"
    unet = json.loads(unet_config_file.read_text()) if unet_config_file.is_file() else {}
    found = (f"pipeline class {name}, UNet context {unet.get('cross_attention_dim')}, input channels "
             f"{unet.get('in_channels')}")
    if unet.get("in_channels", 4) != 4:
        raise UnsupportedModelError(f"The diffusers folder '{folder}' has a UNet with {unet['in_channels']} input "
                                    f"channels ({found}): unsupported family. Use the base model.")
    if name == "StableDiffusionPipeline":
        if unet.get("cross_attention_dim") == 1024:
            raise UnsupportedModelError(f"The diffusers folder '{folder}' is a Stable Diffusion 2.x model ({found}): "
                                        f"unsupported family. Only SD1.5 and SDXL base are supported.")
        return "sd15"
    if name == "StableDiffusionXLPipeline" and index.get("text_encoder") and index["text_encoder"][0]:
        return "sdxl"
    raise UnsupportedModelError(f"The diffusers folder '{folder}' holds a {name} ({found}): unsupported family. "
                                f"Only StableDiffusionPipeline (SD1.5) and StableDiffusionXLPipeline (SDXL base) "
                                f"folders are supported.")


def detect_family(path: str | os.PathLike) -> str:
    """"sd15" or "sdxl" for a diffusers folder or a single-file ``.safetensors`` checkpoint (only its header is
    read). Raises FileNotFoundError for a missing path and UnsupportedModelError for anything else."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UnsupportedModelError(f"The folder '{path}' has no model_index.json: not a diffusers pipeline "
                                        f"folder. Pass a diffusers folder or a single-file .safetensors checkpoint.")
        return _folder_family(path)
    if not path.is_file():
        raise FileNotFoundError(f"No model at '{path}': pass a diffusers folder or a single-file checkpoint (in "
                                f"ComfyUI: models/checkpoints/<name>.safetensors).")
    if path.suffix.lower() != ".safetensors":
        raise UnsupportedModelError(f"'{path.name}' is not a .safetensors file; pickled checkpoints (.ckpt, .pt) are "
                                    f"not read. Convert it to .safetensors, or save it from ComfyUI (CheckpointSave).")
    return family_from_shapes(_safetensors_shapes(path), source=f"'{path.name}'")


def pipeline_family(pipeline) -> str:
    """"sdxl" for a pipeline whose UNet has SDXL's text_time embedding, else "sd15" (see :func:`_folder_family`)."""
    config = pipeline.unet.config
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if config.get("cross_attention_dim") == 1024:
        raise UnsupportedModelError("This pipeline's UNet has context 1024 (Stable Diffusion 2.x): unsupported.")
    return "sd15"


# -- the config folder for from_single_file ---------------------------------------------------------------------
def cache_root() -> Path:
    """``$REFINERY_CACHE``, else ``~/.cache/comfyui-refinery``."""
    env = os.environ.get("REFINERY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "comfyui-refinery"


def _clip_bpe_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges, built from ``open_clip.tokenizer.default_bpe()`` exactly as CLIP builds
    them (byte tokens, byte+"</w>" tokens, the 48,894 merges, the two special tokens): 49,408 tokens."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [token + "</w>" for token in vocab]
    vocab += ["".join(merge) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(vocab)}, merges


def _write_tokenizers(folder: Path, family: str) -> None:
    """tokenizer/ (and tokenizer_2/ for SDXL) as transformers ``CLIPTokenizer`` folders."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe_vocab_and_merges()
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file = Path(scratch, "vocab.json"), Path(scratch, "merges.txt")
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(merge) for merge in merges) + "\n",
                               encoding="utf-8")
        for name, pad_token in TOKENIZERS[family].items():
            tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=CONTEXT_LENGTH,
                                      pad_token=pad_token)
            tokenizer.save_pretrained(str(folder / name))


def _shipped_digest(family: str) -> str:
    digest = hashlib.sha256(TOKENIZER_RECIPE.encode())
    for file in sorted((CONFIG_ROOT / family).rglob("*.json")):
        digest.update(file.relative_to(CONFIG_ROOT).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def diffusers_config_folder(family: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A diffusers-layout folder for ``family`` holding model_index.json, each component's config and the
    tokenizer files, no weights: what ``from_single_file(config=...)`` reads. Built once per content into
    ``<cache_dir or cache_root()>/diffusers-configs/<family>-<digest>/`` (a temporary folder renamed into place, so
    a crash never leaves a half-built one)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
    parent = Path(cache_dir) if cache_dir is not None else cache_root() / "diffusers-configs"
    final = parent / f"{family}-{_shipped_digest(family)}"
    if (final / "model_index.json").is_file():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=parent))
    try:
        shutil.copytree(CONFIG_ROOT / family, temporary, dirs_exist_ok=True)
        _write_tokenizers(temporary, family)
        os.chmod(temporary, 0o755)
        try:
            os.rename(temporary, final)
        except OSError:  # another process built it first
            if not (final / "model_index.json").is_file():
                raise
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return final


# -- loading ---------------------------------------------------------------------------------------------------
def load_sd_pipeline(
    path: str | os.PathLike,
    family: str = "auto",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
):
    """A diffusers ``StableDiffusionPipeline`` (sd15) or ``StableDiffusionXLPipeline`` (sdxl) from ``path``, on the
    CPU, offline.

    path: a diffusers folder (``from_pretrained(local_files_only=True)``; an SD1.5 safety checker is not loaded) or
        a single-file ``.safetensors`` checkpoint as ComfyUI keeps in models/checkpoints/
        (``from_single_file(config=diffusers_config_folder(family), local_files_only=True)``).
    family: "auto" (detected, :func:`detect_family`), "sd15" or "sdxl"; a stated family must match the detected
        one, else UnsupportedModelError names both.
    dtype: the weights' dtype (``torch_dtype``). cache_dir: where the config folder is assembled.
    """
    import diffusers

    if family not in ("auto", *FAMILIES):
        raise ValueError(f"family must be 'auto' or one of {FAMILIES}, got {family!r}.")
    path = Path(path)
    detected = detect_family(path)
    if family != "auto" and family != detected:
        raise UnsupportedModelError(f"family={family!r} was asked for, but '{path}' is a {detected} model.")
    pipeline_class = getattr(diffusers, PIPELINE_CLASSES[detected])
    extra = {"safety_checker": None, "requires_safety_checker": False} if detected == "sd15" else {}
    extra[_dtype_keyword()] = dtype
    if path.is_dir():
        pipeline = pipeline_class.from_pretrained(str(path), local_files_only=True, **extra)
    else:
        config = diffusers_config_folder(detected, cache_dir)
        logger.info("loading %s checkpoint %s with the diffusers config in %s", detected, path, config)
        pipeline = pipeline_class.from_single_file(str(path), config=str(config), local_files_only=True, **extra)
    return pipeline


def _dtype_keyword() -> str:
    """``dtype`` on diffusers versions that renamed ``torch_dtype`` (and warn on the old name), else
    ``torch_dtype``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present since the rename)
    except ImportError:
        return "torch_dtype"
    return "dtype"
