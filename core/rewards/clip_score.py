"""CLIPScore on any open_clip model, and the open_clip plumbing shared by the HPSv2, aesthetic and trained rewards.

CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", eq. 1):
``CLIP-S(c, v) = w * max(cos(c, v), 0)`` with ``w = 2.5``, which stretches the cosines of ViT-B/32 (rarely above
0.4) to about [0, 1]. Range [0, w]. Hessel's reference code prefixes every caption with "A photo depicts "; that is
the ``prompt_prefix`` option here, off by default because our prompts are generation prompts, not captions
(torchmetrics' CLIPScore, another common reading, uses w = 100 and no prefix: pass ``weight=100``).

open_clip checkpoints load offline from one local file (``.safetensors`` preferred; ``.pt/.pth/.bin`` read with
``torch.load(weights_only=True)``), with the architecture given as an open_clip model name, ``"auto"`` (an open_clip
model config ``<checkpoint stem>.json`` beside the checkpoint, as :func:`..clip_surgery.load_quality_clip` reads
it), or a config dict. Any open_clip tower works (ViT, ConvNeXt, ...); only CoCa (``multimodal_cfg``) is refused.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from ..clip_surgery import AUTO_ARCHITECTURE, _register_config_beside
from ..weights import load_state_dict, state_dict_mismatch
from .base import DEFAULT_BATCH_SIZE, RewardModel, example_keys, guess_model_family
from .preprocessing import ImagePreprocess, open_clip_preprocess

logger = logging.getLogger(__name__)

CLIP_SCORE_WEIGHT = 2.5
"""w of CLIPScore (Hessel et al. 2021, sec. 3)."""

Architecture = str | Mapping
"""An open_clip model name, ``"auto"`` (config JSON beside the checkpoint), or an open_clip model config dict."""


# -- building an open_clip model ---------------------------------------------------------------------------------
def resolve_open_clip_config(checkpoint: str | os.PathLike, architecture: Architecture) -> tuple[str, dict]:
    """``(name, config)`` of the open_clip model to build: ``name`` is the open_clip model name ("" for a config
    dict), ``config`` a copy of its model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...)."""
    import open_clip

    if isinstance(architecture, Mapping):
        config = copy.deepcopy(dict(architecture))
        _check_open_clip_config(config, "the given architecture config")
        return "", config
    name = _register_config_beside(Path(checkpoint)) if architecture == AUTO_ARCHITECTURE else str(architecture)
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(
            f"Unknown open_clip architecture '{name}'. Choose one of open_clip's names (the 'architecture' list of "
            f"the Load Reward Model node; open_clip.list_models() in scripts), e.g. 'ViT-H-14' or "
            f"'ViT-L-14-quickgelu', or 'auto' with the model config JSON '<checkpoint stem>.json' beside the checkpoint."
        )
    return name, config


def _check_open_clip_config(config: Mapping, where: str) -> None:
    if not all(isinstance(config.get(key), Mapping) for key in ("vision_cfg", "text_cfg")) or "embed_dim" not in config:
        raise ValueError(f"{where} is not an open_clip model config: it needs 'embed_dim', 'vision_cfg' and 'text_cfg'.")
    if "multimodal_cfg" in config:
        raise ValueError(f"{where} describes a CoCa captioning model; rewards need a contrastive CLIP.")


def build_open_clip(config: Mapping) -> torch.nn.Module:
    """A randomly initialised open_clip CLIP (or CustomTextCLIP) from a model config, on the CPU in float32, without
    any download (timm / Hugging Face towers are built without their pretrained weights: the checkpoint has them).
    Same model classes and arguments as ``open_clip.create_model(name, pretrained=None)``."""
    from open_clip.model import CLIP, CustomTextCLIP

    _check_open_clip_config(config, "The open_clip config")
    config = copy.deepcopy(dict(config))
    text_cfg, vision_cfg = config["text_cfg"], config["vision_cfg"]
    hf_text = "hf_model_name" in text_cfg
    if hf_text:
        text_cfg["hf_model_pretrained"] = False
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    model_class = CustomTextCLIP if (config.pop("custom_text", False) or hf_text) else CLIP
    return model_class(**config)


def open_clip_tokenizer(name: str, config: Mapping):
    """The tokenizer of open_clip model ``name`` (open_clip's own choice), or, for a config without a registered name,
    CLIP's BPE ``SimpleTokenizer`` with the config's context length. Hugging Face tokenizers (``hf_tokenizer_name``)
    would need a download and are refused for unnamed configs."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    if name and open_clip.get_model_config(name) is not None:
        return open_clip.get_tokenizer(name)
    text_cfg = config["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        raise ValueError(
            f"This open_clip config uses the Hugging Face tokenizer '{text_cfg['hf_tokenizer_name']}', which cannot be "
            f"loaded offline without an open_clip architecture name. Save the model under an open_clip architecture."
        )
    return SimpleTokenizer(context_length=int(text_cfg.get("context_length", 77)), **text_cfg.get("tokenizer_kwargs", {}))


def load_open_clip_weights(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, label: str
) -> None:
    """Load ``state_dict`` into ``model`` strictly (DDP ``module.`` prefixes removed), or raise ValueError saying
    whether the file is another model family altogether or an open_clip CLIP of another architecture, with example
    keys. source: the file name, for messages; label: the architecture, for messages."""
    if any(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    expected = model.state_dict()
    shared = set(expected) & set(state_dict)
    if len(shared) < len(expected) / 2:
        family = guess_model_family(state_dict)
        looks_like = f"its keys look like {family}" if family else "its keys are not an open_clip CLIP's"
        raise ValueError(
            f"'{source}' is not an open_clip CLIP state dict for architecture '{label}': {looks_like} "
            f"(e.g. {example_keys(state_dict)}; expected keys such as {example_keys(expected)}). Choose the CLIP "
            f"checkpoint of the reward model."
        )
    details = state_dict_mismatch(state_dict, expected)
    if details:
        raise ValueError(
            f"'{source}' is an open_clip CLIP of another architecture than '{label}': {details}. Choose the "
            f"architecture it was trained as, or 'auto' with its model config JSON beside it."
        )
    model.load_state_dict(state_dict, strict=True)


def load_open_clip(
    checkpoint: str | os.PathLike,
    architecture: Architecture = AUTO_ARCHITECTURE,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    what: str = "open_clip checkpoint",
) -> tuple[torch.nn.Module, str, dict]:
    """Load an open_clip CLIP offline. Returns ``(model, name, config)``: the model on the CPU in float32 (eval
    mode), its open_clip name ("" for a config dict) and model config. ``state_dict`` skips reading the file again
    when the caller has already read it (``checkpoint`` then only names it and locates a config beside it)."""
    path = Path(checkpoint)
    if state_dict is None:
        state_dict = load_state_dict(path, what=what)
    name, config = resolve_open_clip_config(path, architecture)
    model = build_open_clip(config)
    load_open_clip_weights(model, state_dict, path.name, name or "custom config")
    logger.info("Loaded open_clip '%s' from %s", name or "custom config", path)
    return model.eval(), name, config


# -- rewards over an open_clip model -----------------------------------------------------------------------------
class OpenClipReward(RewardModel):
    """A reward over an open_clip CLIP: L2-normalised image and text embeddings, score = cosine (subclasses change
    :meth:`combine`). model: an open_clip CLIP; tokenizer: its tokenizer; preprocess: defaults to open_clip's own
    ``image_transform(image_size, is_train=False)``."""

    kind = "clip-cosine"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        name: str,
        preprocess: ImagePreprocess | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        super().__init__(name, preprocess or open_clip_preprocess(model.visual.image_size), batch_size)
        self.model = model
        self.tokenizer = tokenizer

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) -> (N, D) L2-normalised image embeddings (float32)."""
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """N prompts -> (N, D) L2-normalised text embeddings (float32); text past the context is truncated."""
        tokens = self.tokenizer(prompts).to(self.device)  # (N, context_length)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def combine(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor | None) -> torch.Tensor:
        """cos(image, text) of each pair: (N, D), (N, D) -> (N,) in [-1, 1]."""
        return (image_embeddings * text_embeddings).sum(dim=-1)


class ClipScoreReward(OpenClipReward):
    """CLIPScore ``w * max(cos(image, prompt_prefix + prompt), 0)``, range [0, w] (module docstring)."""

    kind = "clip-score"

    def __init__(self, model, tokenizer, name: str, weight: float = CLIP_SCORE_WEIGHT, prompt_prefix: str = "",
                 preprocess: ImagePreprocess | None = None, batch_size: int = DEFAULT_BATCH_SIZE):
        super().__init__(model, tokenizer, name, preprocess, batch_size)
        self.weight = float(weight)
        self.prompt_prefix = prompt_prefix

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return super().encode_prompts([self.prompt_prefix + prompt for prompt in prompts])

    def combine(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor | None) -> torch.Tensor:
        return self.weight * super().combine(image_embeddings, text_embeddings).clamp(min=0.0)


def load_clip_score(
    checkpoint: str | os.PathLike,
    architecture: Architecture = AUTO_ARCHITECTURE,
    weight: float = CLIP_SCORE_WEIGHT,
    prompt_prefix: str = "",
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> ClipScoreReward:
    """CLIPScore over the open_clip checkpoint ``checkpoint`` (see :func:`load_open_clip` for ``architecture``).

    weight: w (2.5, Hessel et al.). prompt_prefix: text put before every prompt ("A photo depicts " in Hessel's code).
    image_mean, image_std: the checkpoint's normalisation when it is not OpenAI's (e.g. (0.5, 0.5, 0.5) for SigLIP).
    Returns a frozen :class:`ClipScoreReward` on the CPU.
    """
    model, name, config = load_open_clip(checkpoint, architecture, state_dict, what="CLIPScore checkpoint")
    preprocess = open_clip_preprocess(model.visual.image_size, image_mean, image_std)
    reward = ClipScoreReward(model, open_clip_tokenizer(name, config), Path(checkpoint).stem, weight, prompt_prefix,
                             preprocess, batch_size)
    return reward.eval().requires_grad_(False)
