"""One interface for every reward model: :class:`RewardModel`.

A reward maps a batch of images and their prompts to one number per image, higher = better:
``reward.score(images, prompts) -> (B,)``. Images are ComfyUI IMAGE tensors ``(B, H, W, C)`` float in [0, 1]
(C = 3; 1 and 4 are converted, see :func:`..preprocessing.rgb_pixels`), prompts a list of B strings or one string
for all. Subclasses say how to embed pixels and texts and how to combine the two embeddings
(:meth:`RewardModel.encode_pixels`, :meth:`RewardModel.encode_prompts`, :meth:`RewardModel.combine`); batching,
input checks, the text cache and gradient control live here once.

Gradients. ``score(..., differentiable=False)`` runs under ``torch.no_grad``. With ``differentiable=True`` the graph is
kept from the input pixels through preprocessing and the towers, so ``d score / d images`` exists (Focus-N-Fix,
METHODS.md 2), and so do gradients for every parameter whose ``requires_grad`` is True. The loaders return frozen
models (eval mode, ``requires_grad`` False: a reward is a fixed judge, as in DRaFT and Focus-N-Fix); call
``reward.requires_grad_(True)`` to fine-tune one.

Text cache. Prompt embeddings are cached per prompt (an LRU of :data:`TEXT_CACHE_SIZE` entries) whenever the model has
no trainable parameter, so repeated prompts cost one text forward. A model with trainable parameters never caches
(its weights may change between calls). Moving or casting the model (``.to``, ``.half``) empties the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch

from .preprocessing import ALPHA_BACKGROUND, ImagePreprocess, rgb_pixels

DEFAULT_BATCH_SIZE = 16
TEXT_CACHE_SIZE = 4096
REWARD_KINDS = ("clip-score", "hpsv2", "pickscore", "aesthetic", "trained")


def prompt_list(prompts: str | Sequence[str] | None, image_count: int, required: bool = True) -> list[str] | None:
    """The prompts of a batch as a list of ``image_count`` strings.

    prompts: one string (used for every image), a sequence of ``image_count`` strings, or a 1-element sequence
    (broadcast). None is allowed only when ``required`` is False (prompt-free rewards); returns None then.
    Raises ValueError naming both counts when they differ, TypeError for non-strings.
    """
    if prompts is None:
        if required:
            raise ValueError("This reward scores images against prompts: pass one prompt per image, or one for all.")
        return None
    if isinstance(prompts, str):
        return [prompts] * image_count
    prompts = list(prompts)
    bad = [type(prompt).__name__ for prompt in prompts if not isinstance(prompt, str)]
    if bad:
        raise TypeError(f"Prompts must be strings, got {sorted(set(bad))}.")
    if len(prompts) == 1:
        return prompts * image_count
    if len(prompts) != image_count:
        raise ValueError(
            f"Got {len(prompts)} prompts for {image_count} images: pass one prompt per image, or a single prompt "
            f"for all of them."
        )
    return prompts


def example_keys(keys: Iterable[str], count: int = 3) -> list[str]:
    """The first ``count`` keys in sorted order, for error messages."""
    return sorted(keys)[:count]


_KEY_FAMILIES = (  # checked in order: LoRA markers first, as LoRA keys embed the names of the layers they adapt
    ("lora_unet_", "a LoRA (kohya format)"),
    ("lora_te", "a LoRA (kohya format)"),
    ("lora_A.", "a LoRA (peft format)"),
    ("lora_down.", "a LoRA"),
    ("model.diffusion_model.", "a Stable Diffusion checkpoint (UNet)"),
    ("first_stage_model.", "a Stable Diffusion checkpoint (VAE part)"),
    ("cond_stage_model.", "a Stable Diffusion checkpoint (text encoder part)"),
    ("down_blocks.", "a diffusers UNet or VAE"),
    ("encoder.down.", "a VAE"),
    ("vision_model.", "a transformers CLIPModel (the PickScore format is a folder with config.json)"),
    ("text_model.", "a transformers CLIP text model"),
    ("layers.0.", "an aesthetic-predictor MLP head"),
    ("visual.", "an open_clip CLIP"),
)


def guess_model_family(keys: Iterable[str]) -> str | None:
    """A short description of the model family whose state dict has these keys, or None when unknown.

    Used in error messages ("this file looks like a Stable Diffusion checkpoint (UNet)"); the first family with a key
    containing its marker wins. ``{"weight", "bias"}`` alone is a linear head (the older LAION aesthetic format).
    """
    keys = list(keys)
    if set(keys) == {"weight", "bias"}:
        return "a single linear layer (the older LAION aesthetic head)"
    for marker, family in _KEY_FAMILIES:
        if any(key.startswith(marker) or f".{marker}" in key for key in keys):
            return family
    return None


class RewardModel(torch.nn.Module):
    """Base class: a differentiable, batched ``(images, prompts) -> (B,)`` reward.

    name: what the reward is (e.g. the file stem), for reports. kind: one of :data:`REWARD_KINDS` (class attribute).
    preprocess: the model's :class:`..preprocessing.ImagePreprocess`. batch_size: images (and prompts) per forward.
    alpha_background: background of RGBA images (1.0 = white).
    uses_prompts (class attribute): False for prompt-free rewards (aesthetic), which accept ``prompts=None``.
    """

    kind: str = ""
    uses_prompts: bool = True

    def __init__(
        self,
        name: str,
        preprocess: ImagePreprocess,
        batch_size: int = DEFAULT_BATCH_SIZE,
        alpha_background: float = ALPHA_BACKGROUND,
    ):
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.name = name
        self.preprocess = preprocess
        self.batch_size = int(batch_size)
        self.alpha_background = float(alpha_background)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # -- subclass contract ------------------------------------------------------------------------------------
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (N, 3, h, w) normalised tower input in the model's dtype -> (N, D) image embeddings."""
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """N prompts -> (N, D) text embeddings (only called when ``uses_prompts``)."""
        raise NotImplementedError

    def combine(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor | None) -> torch.Tensor:
        """(N, D) image and (N, D) text embeddings of matching pairs (None for prompt-free rewards) -> (N,) scores."""
        raise NotImplementedError

    # -- device -----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the model's parameters (where scores are computed and returned)."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the model's parameters (tower inputs are cast to it)."""
        return next(parameter.dtype for parameter in self.parameters() if parameter.is_floating_point())

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() go through here: cached text embeddings would be on the old device or dtype
        self.clear_text_cache()
        return super()._apply(fn, *args, **kwargs)

    def clear_text_cache(self) -> None:
        """Forget every cached prompt embedding."""
        self._text_cache.clear()

    def _caches_text(self) -> bool:
        return not any(parameter.requires_grad for parameter in self.parameters())

    # -- scoring ----------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, prompts: str | Sequence[str] | None = None) -> torch.Tensor:
        """The differentiable score, as any module's forward: ``score(images, prompts, differentiable=True)``."""
        return self.score(images, prompts, differentiable=True)

    def score(
        self, images: torch.Tensor, prompts: str | Sequence[str] | None = None, differentiable: bool = False
    ) -> torch.Tensor:
        """Reward of each image for its prompt.

        images: (B, H, W, C) float in [0, 1], C in {1, 3, 4}, any size and device. prompts: B strings, or one string
        (or a 1-element list) for all; ignored by prompt-free rewards (may be None there; if given, the count is
        still checked). differentiable: keep the autograd graph (see the module docstring); an enclosing
        ``torch.no_grad()`` still wins.
        Returns (B,) float32 on the model's device; the value range is the reward's own (see each subclass).
        Raises ValueError for 0 images, a bad layout, or a prompt count that is neither 1 nor B.
        """
        pixels = rgb_pixels(images, self.alpha_background)  # (B, 3, H, W), validates the layout
        prompts = prompt_list(prompts, pixels.shape[0], required=self.uses_prompts)
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            text = self._prompt_embeddings(prompts) if self.uses_prompts else None  # (B, D) or None
            scores = []
            for start in range(0, pixels.shape[0], self.batch_size):
                chunk = pixels[start : start + self.batch_size].to(self.device)
                tower_input = self.preprocess(chunk).to(self.dtype)  # (b, 3, h, w)
                image = self.encode_pixels(tower_input)  # (b, D)
                chunk_text = None if text is None else text[start : start + self.batch_size]
                scores.append(self.combine(image, chunk_text).float())
            return torch.cat(scores)

    def _prompt_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """B prompts -> (B, D): each distinct prompt is embedded once (in chunks of ``batch_size``), from the cache
        when :meth:`_caches_text`."""
        distinct = list(dict.fromkeys(prompts))
        if not self._caches_text():
            embeddings = self._embed_in_chunks(distinct)
            index = {prompt: row for row, prompt in enumerate(distinct)}
            return embeddings[torch.tensor([index[prompt] for prompt in prompts], device=embeddings.device)]
        missing = [prompt for prompt in distinct if prompt not in self._text_cache]
        if missing:
            with torch.no_grad():
                self._text_cache.update(zip(missing, self._embed_in_chunks(missing)))
        for prompt in distinct:
            self._text_cache.move_to_end(prompt)
        embeddings = torch.stack([self._text_cache[prompt] for prompt in prompts])
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return embeddings

    def _embed_in_chunks(self, prompts: list[str]) -> torch.Tensor:
        starts = range(0, len(prompts), self.batch_size)
        return torch.cat([self.encode_prompts(prompts[start : start + self.batch_size]) for start in starts])

    def extra_repr(self) -> str:
        return f"name={self.name!r}, kind={self.kind!r}, batch_size={self.batch_size}"
