"""Measurements shared by the toy-world benchmarks: scores of pictures (PQ-Map, AQ-Map, toy CLIP), image
metrics (PSNR, SSIM), AUROC and localisation of defect maps, and the AQ-Map flag rates.

Shapes: pictures are (N, H, W, 3) float in [0, 1]; maps and masks (N, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from ...core import aq_map, pq_map
from ...core.clip_surgery import SurgeryCLIP, load_quality_clip
from ...core.masks import dilate, gaussian_blur
from . import data
from .train_prompts import encode_in_batches, load_alpha

PSNR_CAP_DB = 100.0

EXPECTED_DEFECT = {
    "missing_object": aq_map.NOUN_UNMATCHED,
    "wrong_colour": aq_map.ADJECTIVE_UNMATCHED,
    "wrong_count": aq_map.ADJECTIVE_UNMATCHED,
}


def pointing_hits(defect_scores: torch.Tensor, masks: torch.Tensor, tolerance: int = 1) -> np.ndarray:
    """defect_scores: (N, H, W) higher = more defective; masks: (N, H, W) bool. Hit = argmax inside the dilated mask."""
    grown = dilate(masks.float(), tolerance) > 0.5 if tolerance else masks
    flat = defect_scores.flatten(1).argmax(dim=1)
    return grown.flatten(1)[torch.arange(len(flat)), flat].numpy()


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC of ``scores`` for binary ``labels`` (ties count half)."""
    positives = labels.sum()
    negatives = labels.size - positives
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def localisation(defect_scores: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    """(pointing-game hit rate, mean per-picture pixel AUROC) over pictures with a defect."""
    has_defect = masks.flatten(1).any(dim=1)
    scores, truth = defect_scores[has_defect], masks[has_defect]
    hits = pointing_hits(scores, truth)
    aurocs = [auroc(s.flatten().numpy(), t.flatten().numpy()) for s, t in zip(scores, truth)]
    return float(hits.mean()), float(np.mean(aurocs))


def evaluate_aq(encoder, cases, a_bound: float) -> dict[str, float]:
    flagged_right, hits, false_flags, flagged_pictures, phrases_on_correct = 0, [], 0, 0, 0
    defective = [case for case in cases if case.kind is not None]
    correct = [case for case in cases if case.kind is None]
    for case in cases:
        features = encoder.encode_image(case.image[None])
        result = aq_map.alignment_quality(encoder, features, [case.caption], a_bound=a_bound)
        rows = result.reports[0]
        if case.kind is None:
            flags = sum(row.defect is not None for row in rows)
            false_flags += flags
            phrases_on_correct += len(rows)
            flagged_pictures += int(flags > 0)
            continue
        target = [row for row in rows if row.noun == case.target_noun]
        flagged_right += int(any(row.defect == EXPECTED_DEFECT[case.kind] for row in target))
        if float(result.map.max()) > 0:
            hits.append(bool(pointing_hits(result.map, torch.from_numpy(case.mask)[None])[0]))
        else:
            hits.append(False)
    return {
        "right_flag_rate": flagged_right / max(1, len(defective)),
        "pointing": float(np.mean(hits)) if hits else 0.0,
        "false_flag_rate_phrases": false_flags / max(1, phrases_on_correct),
        "false_flag_rate_pictures": flagged_pictures / max(1, len(correct)),
    }


def calibrated_a_bound(encoder, count: int = 200, quantile: float = 0.05) -> float:
    """5th percentile of the noun scores a_pns on correct training pictures."""
    scores = []
    for case in data.alignment_cases(count * 4, data.TRAIN_SEED_OFFSET + 5 * 10**6)[::4]:  # the correct ones
        result = aq_map.alignment_quality(encoder, encoder.encode_image(case.image[None]), [case.caption])
        scores += [row.noun_score for row in result.reports[0]]
    return float(np.quantile(scores, quantile))


# ------------------------------------------------------------------------------------------------ scoring
@dataclass
class QualityModels:
    """toy-clip (encoder), its PQ prompt features (4, 2, D) and calibrated alpha (3 bounds)."""

    encoder: SurgeryCLIP
    prompt_features: torch.Tensor
    alpha: tuple[float, float, float]


def load_quality_models(checkpoint: Path = data.TOY_CLIP_CHECKPOINT, prompts: Path = data.TOY_PROMPTS) -> QualityModels:
    encoder = load_quality_clip(checkpoint)
    with torch.no_grad():
        features = pq_map.encode_quality_prompts(encoder, pq_map.load_prompt_embeddings(prompts))
    return QualityModels(encoder, features, load_alpha(prompts))


@dataclass
class Scores:
    """perceptual_map P, alignment_map A: (N, H, W) in [0, 1]; perceptual p: (N,) in [0, 1]; alignment a: (N,)
    eq. 8 scores; clip: (N,) cosine of image and caption embeddings in [-1, 1]; emphasized_prompts: N strings."""

    perceptual_map: torch.Tensor
    alignment_map: torch.Tensor
    perceptual: torch.Tensor
    alignment: torch.Tensor
    clip: torch.Tensor
    emphasized_prompts: list[str]


def score_pictures(models: QualityModels, images: torch.Tensor, captions: list[str]) -> Scores:
    """PQ-Map, AQ-Map and the toy CLIP score of (N, H, W, 3) pictures in [0, 1] against their N captions."""
    encoder = models.encoder
    with torch.no_grad():
        features = encode_in_batches(encoder, images)
        perceptual = pq_map.perceptual_quality(features, models.prompt_features, encoder.logit_scale, models.alpha)
        alignment = aq_map.alignment_quality(encoder, features, captions)
        clip = (features.cls_embedding * encoder.encode_text(captions)).sum(dim=-1)  # (N,) both L2-normalised
    return Scores(perceptual.map, alignment.map, perceptual.score, alignment.score.float(), clip,
                  alignment.emphasized_prompts)


# ------------------------------------------------------------------------------------------------ image metrics
def ssim_map(first: torch.Tensor, second: torch.Tensor, sigma: float = 1.5, window: int = 11) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004, Gaussian window, K1 0.01, K2 0.03, data range 1) of (N, H, W, 3) pictures
    in [0, 1], averaged over the channels: (N, H, W), 1 = identical neighbourhood."""
    c1, c2 = 0.01**2, 0.03**2
    n, h, w, _ = first.shape
    x = first.permute(0, 3, 1, 2).reshape(-1, h, w).double()  # (N*3, H, W)
    y = second.permute(0, 3, 1, 2).reshape(-1, h, w).double()

    def local_mean(values):
        return gaussian_blur(values, sigma, window)

    mean_x, mean_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mean_x**2
    var_y = local_mean(y * y) - mean_y**2
    covariance = local_mean(x * y) - mean_x * mean_y
    ssim = ((2 * mean_x * mean_y + c1) * (2 * covariance + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
    return ssim.reshape(n, 3, h, w).mean(dim=1).float()  # (N, H, W)


def masked_mean(values: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Mean of (N, H, W) or (N, H, W, C) values over the pixels where the (N, H, W) bool region is True: (N,);
    NaN for an empty region."""
    weights = region.float()
    if values.ndim == 4:
        values = values.mean(dim=-1)  # (N, H, W, C) -> (N, H, W)
    return (values * weights).flatten(1).sum(1) / weights.flatten(1).sum(1)  # 0 / 0 = NaN for an empty region


def psnr(first: torch.Tensor, second: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of (N, H, W, 3) pictures in [0, 1] over the (N, H, W) bool region, capped at PSNR_CAP_DB: (N,)."""
    mse = masked_mean((first - second) ** 2, region)
    return (10 * torch.log10(1.0 / mse.clamp(min=10 ** (-PSNR_CAP_DB / 10)))).clamp(max=PSNR_CAP_DB)


def vae_roundtrip(pipeline, images: torch.Tensor) -> torch.Tensor:
    """Decode(encode(x)) with the pipeline's VAE (latent mean): (N, H, W, 3) in [0, 1] -> the same."""
    with torch.no_grad():
        pixels = images.permute(0, 3, 1, 2) * 2 - 1  # BHWC [0, 1] -> BCHW [-1, 1]
        latents = pipeline.vae.encode(pixels).latent_dist.mean
        decoded = pipeline.vae.decode(latents).sample
    return ((decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
