"""G-Refine's two quality maps of an image batch from one quality-model forward per chunk: the PQ-Map P and score p
(g-refine.txt eq. 2-3, :mod:`.pq_map`) and the AQ-Map A and score a (eq. 4-8, :mod:`.aq_map`), METHODS.md 1.2-1.3.

The one composition of the two: the ComfyUI nodes, the Focus-N-Fix region function and the demo call
:func:`compute_quality_maps`. One CLIP-Surgery forward (:meth:`.clip_surgery.SurgeryCLIP.encode_image`) serves both
maps of a chunk (ARCHITECTURE.md, performance rules); with ``reuse_features`` separate calls on the same pixels (the
PQ-Map and AQ-Map nodes) share it through the encoder's image-feature cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import aq_map, pq_map
from .clip_surgery import SurgeryCLIP
from .rewards.base import prompt_list

Progress = Callable[[int, int], None]
"""``progress(done, total)``: called with the number of images done before each chunk's forward (0 before the first)
and once at the end (done == total); a ComfyUI node passes one that advances its ProgressBar and raises on a pending
interrupt, so a cancelled run stops between chunks."""


@dataclass
class QualityMaps:
    """Maps of a batch; the fields of a map not asked for are None / empty.

    perceptual_map P, alignment_map A: (B, H, W) in [0, 1] (P: 1 = good quality; A: 1 = must change);
    perceptual_score p, alignment_score a: (B,) in [0, 1]; emphasized_prompts (eq. 7), reports
    (:class:`.aq_map.PhraseReport` lists) and warnings: one entry per image (AQ-Map)."""

    perceptual_map: torch.Tensor | None = None
    perceptual_score: torch.Tensor | None = None
    alignment_map: torch.Tensor | None = None
    alignment_score: torch.Tensor | None = None
    emphasized_prompts: list = field(default_factory=list)
    reports: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


@torch.no_grad()
def compute_quality_maps(
    encoder: SurgeryCLIP,
    images: torch.Tensor,
    *,
    perceptual: bool = True,
    quality_prompts: pq_map.QualityPrompts | torch.Tensor | None = None,
    alpha: tuple[float, float, float] = pq_map.DEFAULT_ALPHA,
    temperature: float = 0.0,
    prompt: str | Sequence[str] | None = None,
    noun_bound: float = 0.5,
    phrase_bound: float = 0.5,
    emphasis: float = 1.1,
    alignment_temperature: float = aq_map.DEFAULT_TEMPERATURE,
    chunk_size: int | None = None,
    reuse_features: bool = False,
    progress: Progress | None = None,
) -> QualityMaps:
    """PQ-Map (when ``perceptual``) and AQ-Map (when ``prompt`` is not None) of ``images``.

    images: (B, H, W, 3) float in [0, 1], on any device (the encoder's is used; the maps come back on the images').
    quality_prompts: the four prompt pairs of eq. 2 as :class:`.pq_map.QualityPrompts`, or already encoded
    ((4, 2, D) from :func:`.pq_map.encode_quality_prompts`); None = the plain-text pairs. alpha: eq. 3's three cask
    bounds; temperature: the PQ softmax temperature, 0 = the model's own logit scale. prompt: one prompt for every
    image or one per image; noun_bound (a_bound), phrase_bound (beta), emphasis: eq. 6-8's knobs
    (:func:`.aq_map.alignment_quality`); alignment_temperature: the AQ phrase and noun scores' temperature (eq. 5,
    default 10 as the official AQ script). chunk_size: images per forward (None = the whole batch in one).
    reuse_features: look every chunk up in the encoder's image-feature cache (:meth:`.SurgeryCLIP.encode_image`
    ``cached``), so another call on the same pixels shares the forward. progress: see :data:`Progress`.
    Runs without gradients; the results are ordinary tensors (no inference-mode tensors), usable in a training loss.
    """
    batch = images.shape[0]
    if batch == 0:
        raise ValueError(f"The image batch is empty (shape {tuple(images.shape)}): give at least one image.")
    prompts = None if prompt is None else prompt_list(prompt, batch)
    chunk_size = batch if chunk_size is None else int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (images per forward), got {chunk_size}.")
    prompt_features = None
    if perceptual:
        prompt_features = quality_prompts
        if not isinstance(quality_prompts, torch.Tensor):
            prompts_or_text = pq_map.text_quality_prompts() if quality_prompts is None else quality_prompts
            prompt_features = pq_map.encode_quality_prompts(encoder, prompts_or_text)  # (4, 2, D)
    parts: dict[str, list[torch.Tensor]] = {"P": [], "p": [], "A": [], "a": []}
    result = QualityMaps()
    for start in range(0, batch, chunk_size):
        if progress is not None:
            progress(start, batch)
        stop = min(start + chunk_size, batch)
        features = encoder.encode_image(images[start:stop], cached=reuse_features)
        if perceptual:
            quality = pq_map.perceptual_quality(features, prompt_features, temperature or encoder.logit_scale, alpha)
            parts["P"].append(quality.map.to(images.device))
            parts["p"].append(quality.score.to(images.device))
        if prompts is not None:
            alignment = aq_map.alignment_quality(encoder, features, prompts[start:stop], noun_bound, phrase_bound,
                                                 emphasis, temperature=alignment_temperature)
            parts["A"].append(alignment.map.to(images.device))
            parts["a"].append(alignment.score.to(images.device))
            result.emphasized_prompts += alignment.emphasized_prompts
            result.reports += alignment.reports
            result.warnings += alignment.warnings
    if progress is not None:
        progress(batch, batch)
    if perceptual:
        result.perceptual_map, result.perceptual_score = torch.cat(parts["P"]), torch.cat(parts["p"])
    if prompts is not None:
        result.alignment_map, result.alignment_score = torch.cat(parts["A"]), torch.cat(parts["a"])
    return result
