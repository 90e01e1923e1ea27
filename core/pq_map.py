"""G-Refine perceptual quality map (PQ-Map): g-refine.txt eq. 2-3, METHODS.md 1.2.

Four quality factors, each a (positive, negative) prompt pair: overall, technical, rational, natural.
Prompt pairs come as token-embedding sequences (learned CoOp contexts, fed past the token-embedding layer) or as
plain text (the zero-training fallback). Map convention: P in [0, 1], 1 = good quality.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .clip_surgery import ImageFeatures, SurgeryCLIP
from .weights import load_state_dict, load_torch_file, save_safetensors_atomic

QUALITY_FACTORS = ("overall", "technical", "rational", "natural")

DEFAULT_TEXT_PROMPTS: dict[str, tuple[str, str]] = {
    "overall": ("Good photo.", "Bad photo."),
    "technical": ("Sharp clean photo.", "Blurry noisy photo."),
    "rational": ("Well-formed objects.", "Distorted deformed objects."),
    "natural": ("Natural photo.", "Unnatural photo."),
}
"""CLIP-IQA-style antonym pairs for the plain-text fallback."""

DEFAULT_ALPHA = (0.935, 0.892, 0.826)
"""Per-factor cask bounds alpha[1..3] (technical, rational, natural): Q-Refine's AGIN mean preferences."""

QREFINE_CONTEXT_SPLIT = 8
QREFINE_CLASS_TOKENS = 3


@dataclass
class QualityPrompts:
    """The four (positive, negative) prompt pairs of eq. 2, as token embeddings or as text.

    embeddings: factor -> (2, L, W) token-embedding sequences (row 0 positive, row 1 negative), or empty.
    eot_positions: factor -> (2,) int positions of the end-of-text token in those sequences.
    texts: factor -> (positive, negative) strings, used when ``embeddings`` is empty.
    source: where they came from, for reports.
    """

    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    eot_positions: dict[str, torch.Tensor] = field(default_factory=dict)
    texts: dict[str, tuple[str, str]] = field(default_factory=dict)
    source: str = "text"

    @property
    def width(self) -> int | None:
        """Token-embedding width W, or None for text prompts."""
        return int(next(iter(self.embeddings.values())).shape[-1]) if self.embeddings else None


def text_quality_prompts(pairs: dict[str, tuple[str, str]] | None = None) -> QualityPrompts:
    """Plain-text prompt pairs (default :data:`DEFAULT_TEXT_PROMPTS`); works for any tower."""
    pairs = dict(DEFAULT_TEXT_PROMPTS if pairs is None else pairs)
    missing = [factor for factor in QUALITY_FACTORS if factor not in pairs]
    if missing:
        raise ValueError(f"Text prompt pairs are missing the factors {missing}; give all of {QUALITY_FACTORS}.")
    return QualityPrompts(texts={factor: tuple(pairs[factor]) for factor in QUALITY_FACTORS}, source="text")


def qrefine_file_name(factor: str) -> str:
    """The official Q-Refine prompt file of a factor: ``PQ-<factor>.pth``."""
    return f"PQ-{factor}.pth"


def qrefine_files(folder: str | os.PathLike) -> list[Path]:
    """The four files :func:`load_qrefine_embeddings` reads from ``folder``, one per quality factor (whether they
    exist or not); a loader fingerprints all of them, so replacing any one reloads the prompts."""
    return [Path(folder) / qrefine_file_name(factor) for factor in QUALITY_FACTORS]


def load_qrefine_embeddings(folder: str | os.PathLike) -> QualityPrompts:
    """Load the official Q-Refine ``PQ-<factor>.pth`` files (CoOp contexts for OpenAI ViT-B/16).

    Each file holds ``params`` with ``prompt_learner.ctx`` (2, 16, 512), ``token_prefix`` (2, 1, 512) and
    ``token_suffix`` (2, 60, 512) (read with ``weights_only=True``; a truncated or foreign file is named in a
    ValueError saying what is wrong with it). The sequence is prefix | ctx[:8] | suffix[:3] (class name) | ctx[8:] |
    suffix[3:], so the end-of-text token sits at 1 + 16 + 3 = 20 (the official script's index).
    """
    folder = Path(folder)
    embeddings, eot_positions = {}, {}
    for factor, path in zip(QUALITY_FACTORS, qrefine_files(folder)):
        if not path.is_file():
            raise FileNotFoundError(
                f"Q-Refine embeddings folder '{folder}' lacks 'PQ-{factor}.pth'; it needs PQ-overall.pth, "
                f"PQ-technical.pth, PQ-rational.pth and PQ-natural.pth."
            )
        raw = load_torch_file(path, what="Q-Refine prompt file")
        params = raw.get("params", raw) if isinstance(raw, dict) else {}
        try:
            context = params["prompt_learner.ctx"].float()
            prefix = params["prompt_learner.token_prefix"].float()
            suffix = params["prompt_learner.token_suffix"].float()
        except KeyError as error:
            raise ValueError(
                f"'{path}' is not a Q-Refine prompt file: no {error} in its params. Put the official PQ-{factor}.pth "
                f"there."
            ) from error
        head, tail = context[:, :QREFINE_CONTEXT_SPLIT], context[:, QREFINE_CONTEXT_SPLIT:]
        classes, rest = suffix[:, :QREFINE_CLASS_TOKENS], suffix[:, QREFINE_CLASS_TOKENS:]
        embeddings[factor] = torch.cat([prefix, head, classes, tail, rest], dim=1)  # (2, 77, 512)
        eot = prefix.shape[1] + context.shape[1] + QREFINE_CLASS_TOKENS
        eot_positions[factor] = torch.full((2,), eot, dtype=torch.long)
    return QualityPrompts(embeddings=embeddings, eot_positions=eot_positions, source=f"qrefine:{folder.name}")


def save_prompt_embeddings(prompts: QualityPrompts, path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Save learned prompts as safetensors: ``<factor>.embeddings`` (2, L, W) and ``<factor>.eot_positions`` (2,)."""
    if not prompts.embeddings:
        raise ValueError("Only token-embedding prompts can be saved; text prompts need no file.")
    tensors = {}
    for factor in QUALITY_FACTORS:
        tensors[f"{factor}.embeddings"] = prompts.embeddings[factor].float()
        tensors[f"{factor}.eot_positions"] = prompts.eot_positions[factor].long()
    return save_safetensors_atomic(tensors, path, {"format": "refinery-quality-prompts", **(metadata or {})})


def load_prompt_embeddings(path: str | os.PathLike) -> QualityPrompts:
    """Load quality prompts: a Refinery ``.safetensors`` (see :func:`save_prompt_embeddings`) or a folder of the
    official Q-Refine ``PQ-<factor>.pth`` files."""
    path = Path(path)
    if path.is_dir():
        return load_qrefine_embeddings(path)
    tensors = load_state_dict(path, what="quality prompt embeddings file")
    embeddings, eot_positions = {}, {}
    for factor in QUALITY_FACTORS:
        if f"{factor}.embeddings" not in tensors or f"{factor}.eot_positions" not in tensors:
            raise ValueError(
                f"'{path.name}' is not a quality-prompt file: it lacks '{factor}.embeddings' / "
                f"'{factor}.eot_positions'. Expected the output of the Refinery prompt learner."
            )
        embeddings[factor] = tensors[f"{factor}.embeddings"].float()
        eot_positions[factor] = tensors[f"{factor}.eot_positions"].long()
        if embeddings[factor].ndim != 3 or embeddings[factor].shape[0] != 2:
            raise ValueError(f"'{path.name}': {factor}.embeddings must be (2, L, W), got {tuple(embeddings[factor].shape)}.")
    return QualityPrompts(embeddings=embeddings, eot_positions=eot_positions, source=path.name)


def encode_quality_prompts(encoder: SurgeryCLIP, prompts: QualityPrompts) -> torch.Tensor:
    """Text features T_p of eq. 2: (4, 2, D) L2-normalised, factor-major, [:, 0] positive, [:, 1] negative."""
    if prompts.embeddings:
        sequences = torch.cat([prompts.embeddings[factor] for factor in QUALITY_FACTORS])  # (8, L, W)
        positions = torch.cat([prompts.eot_positions[factor] for factor in QUALITY_FACTORS])  # (8,)
        with torch.no_grad():
            features = encoder.encode_token_embeddings(sequences, positions)
    else:
        features = encoder.encode_text([text for factor in QUALITY_FACTORS for text in prompts.texts[factor]])
    return features.view(len(QUALITY_FACTORS), 2, -1)


def pair_probability(features: torch.Tensor, pair_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """``softmax(logit_scale * [cos(f, t+), cos(f, t-)])[0]``: L_raw of g-refine.txt eq. 3 (probability form,
    METHODS.md 1.2) and A/a of eq. 5 when the negative is the empty prompt "".

    features: (..., D) L2-normalised; pair_features: (F, 2, D) L2-normalised. Returns (..., F) in [0, 1].
    Subtracting a shared redundant similarity (feature surgery against "") from both logits leaves this
    unchanged, so the pair form needs no separate surgery step.
    """
    logits = logit_scale * torch.einsum("...d,fkd->...fk", features, pair_features.to(features))  # (..., F, 2)
    return logits.softmax(dim=-1)[..., 0]


def cask_effect(raw: torch.Tensor, alpha: torch.Tensor | tuple[float, float, float]) -> torch.Tensor:
    """L_per of g-refine.txt eq. 3: ``raw[..., 0] * prod_{i=1..3} min(raw[..., i] / alpha[i], 1)``.

    raw: (..., 4) factor probabilities in [0, 1] (overall, technical, rational, natural); alpha: 3 bounds in
    (0, 1], one per defect factor. Returns (...) in [0, 1].
    """
    alpha = torch.as_tensor(alpha, dtype=raw.dtype, device=raw.device)
    if alpha.shape != (3,) or bool((alpha <= 0).any()) or bool((alpha > 1).any()):
        raise ValueError(f"alpha needs 3 bounds in (0, 1] (technical, rational, natural), got {alpha.tolist()}.")
    return raw[..., 0] * torch.clamp(raw[..., 1:] / alpha, max=1.0).prod(dim=-1)


def upsample_map(grid_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """BIC(.) of g-refine.txt eq. 3: (B, gh, gw) -> (B, H, W) bicubic, clamped to [0, 1].

    The bicubic kernel of ``F.interpolate(mode="bicubic", align_corners=False)`` is separable, so the map is computed
    as ``rows @ grid @ columns.T`` with that kernel's (H, gh) and (W, gw) weight matrices
    (:func:`bicubic_weights`): the same values up to float rounding, in two small matrix products instead of
    sixteen taps per output pixel."""
    grid_map = grid_map.float()
    rows = bicubic_weights(grid_map.shape[-2], size[0]).to(grid_map.device)  # (H, gh)
    columns = bicubic_weights(grid_map.shape[-1], size[1]).to(grid_map.device)  # (W, gw)
    return (rows @ grid_map @ columns.T).clamp(0.0, 1.0)  # (H, gh) @ (B, gh, gw) @ (gw, W) -> (B, H, W)


@functools.lru_cache(maxsize=64)
def bicubic_weights(source: int, target: int) -> torch.Tensor:
    """(target, source) float32 weights of 1-D bicubic resampling from ``source`` to ``target`` samples, exactly as
    ``F.interpolate(mode="bicubic", align_corners=False)`` weighs them (cubic convolution a = -0.75, edge samples
    repeated): the image of each unit vector under that interpolation (the other axis kept at size 1, where its
    weights are exactly 1)."""
    unit_vectors = torch.eye(source).view(source, 1, source, 1)  # (source, 1, source, 1): one unit vector per image
    weights = F.interpolate(unit_vectors, size=(target, 1), mode="bicubic", align_corners=False)
    return weights[:, 0, :, 0].T.contiguous()  # (source, target) -> (target, source)


@dataclass(frozen=True)
class PerceptualQuality:
    """PQ-Map result for a batch.

    map: (B, H, W) P in [0, 1], 1 = good; score: (B,) p in [0, 1];
    factor_scores: (B, 4) L_raw of the CLS token per factor; factor_maps: (B, 4, gh, gw) L_raw per patch.
    """

    map: torch.Tensor
    score: torch.Tensor
    factor_scores: torch.Tensor
    factor_maps: torch.Tensor


def perceptual_quality(
    features: ImageFeatures,
    prompt_features: torch.Tensor,
    logit_scale: float,
    alpha: tuple[float, float, float] = DEFAULT_ALPHA,
) -> PerceptualQuality:
    """PQ-Map P and score p of g-refine.txt eq. 3 from one surgery forward.

    features: from :meth:`SurgeryCLIP.encode_image`; prompt_features: (4, 2, D) from
    :func:`encode_quality_prompts`; logit_scale: softmax temperature (the model's own by default, METHODS.md 1.2).
    """
    factor_maps = pair_probability(features.patch_features, prompt_features, logit_scale)  # (B, gh, gw, 4)
    factor_scores = pair_probability(features.cls_embedding, prompt_features, logit_scale)  # (B, 4)
    grid_quality = cask_effect(factor_maps, alpha)  # (B, gh, gw)
    return PerceptualQuality(
        map=upsample_map(grid_quality, features.image_size),
        score=cask_effect(factor_scores, alpha),
        factor_scores=factor_scores,
        factor_maps=factor_maps.permute(0, 3, 1, 2),
    )
