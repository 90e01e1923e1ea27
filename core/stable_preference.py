"""Stable Preference losses and weak augmentation (stable-preference.txt, Li, Niu, Zhao; METHODS.md section 3).

Scores. Every loss here takes preference scores ``S = F_theta(I, T)`` on the *logit* scale, i.e. for a CLIP reward
``S = logit_scale * cos(image_embedding, text_embedding)`` (:func:`clip_scores`). Eq. 3 feeds S straight into a
softmax, so S must be a logit; and the paper's constants only make sense on that scale: b = 0.3, tau = 0.2 (eq. 7)
are "just right" margins of about 0.3 logit (a 57 % choice), and eq. 8's softmax over dS would be flat on raw
cosines, whose pair differences are about 0.01. The ranking of images is the same for cosines and logits, so a
saved reward can still report the plain cosine.

Sign conventions (checked against the paper's text and tables):
- ``preferred`` is the human-preferred image of each pair (the paper's I_1, label [1, 0]); ``dS = S_preferred -
  S_rejected`` (eq. 7: "the better image minus the worse image"), so dS > 0 means the model agrees with the label.
- Step 1 (eq. 7) weights a pair by ``1 / (1 + exp((dS - b) / tau))``: about 1 when the model is wrong (dS < 0), 0.5
  at dS = b, about 0 once the pair is ordered with some margin: only the order is corrected.
- Step 2 (eq. 8) weights pair j by ``exp(dS_j) / sum_i exp(dS_i)``: *larger* dS gets *more* weight (Table 3 compares
  this against exp(-dS) and 1/N and keeps exp(+dS)); pairs the model still gets wrong, or finds nearly equal,
  count little, which is what keeps a noisy or near-tie label from being forced apart.
- Both weights are gates, not objectives: they are detached, so no gradient flows through the weight itself (a
  gradient through eq. 7's denominator would push every margin up by ``L / tau``, the opposite of step 1's aim).
  The paper does not state it for eq. 7; METHODS.md states it for eq. 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

STEP_ONE_B = 0.3
STEP_ONE_TAU = 0.2
STEP_ONE_FRACTION = 0.1  # 3,000 of 30,000 steps in the paper (sec. 4.2)
AUGMENTATIONS = 3  # k, extra views per image (sec. 4.2)
CROP_SCALE = (0.85, 1.0)  # RandomResizedCrop area bounds (sec. 4.2)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect-ratio bounds: torchvision's default (the paper names none)


def clip_scores(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Preference scores S of eq. 1 for a CLIP reward: ``logit_scale * cos(image, text)``.

    image_features: (N, V, D) embeddings of V views per prompt (need not be normalised); text_features: (N, D);
    logit_scale: the model's temperature ``exp(logit_scale)`` (about 100 for trained CLIP), a scalar. Returns (N, V).
    """
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    return logit_scale * torch.einsum("nvd,nd->nv", image, text)


def preference_loss(preferred: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """L_pref, eq. 2-3: cross-entropy of the preference label over the softmax of the pair's two scores
    (Bradley-Terry). Eq. 2 is printed without its minus sign; the loss is ``-sum_i y_i log y_hat_i``, which for
    label [1, 0] is ``-log(e^S1 / (e^S1 + e^S2)) = softplus(-(S1 - S2))``.

    preferred, rejected: (N,) logit-scale scores (module docstring). Returns (N,) per-pair losses, >= 0.
    """
    return F.softplus(rejected - preferred)


def anti_interference_loss(
    preferred: torch.Tensor, rejected: torch.Tensor, preferred_views: torch.Tensor, rejected_views: torch.Tensor
) -> torch.Tensor:
    """L_ai, eq. 5-6: ``-log(e^inter / (e^inter + e^intra)) = softplus(intra - inter)`` with, over each image's
    original score and its k weakly augmented views,
    ``inter = min(preferred scores) - max(rejected scores)`` (the worst-case margin across views) and
    ``intra = ((max - min)(preferred scores) + (max - min)(rejected scores)) / 2`` (the mean spread of one image's
    scores under perturbation). It falls as the views of one image agree and the two images separate.

    preferred, rejected: (N,) scores of the originals; preferred_views, rejected_views: (N, k) scores of the views
    (k >= 0; with k = 0, intra = 0 and L_ai equals L_pref). Returns (N,) per-pair losses.
    """
    if preferred_views.shape != rejected_views.shape or preferred_views.shape[:1] != preferred.shape:
        raise ValueError(
            f"View scores must be (N, k) for both images with N = {tuple(preferred.shape)}; got "
            f"{tuple(preferred_views.shape)} and {tuple(rejected_views.shape)}."
        )
    first = torch.cat([preferred[:, None], preferred_views], dim=1)  # (N, 1 + k)
    second = torch.cat([rejected[:, None], rejected_views], dim=1)  # (N, 1 + k)
    inter = first.amin(dim=1) - second.amax(dim=1)  # (N,)
    intra = ((first.amax(dim=1) - first.amin(dim=1)) + (second.amax(dim=1) - second.amin(dim=1))) / 2  # (N,)
    return F.softplus(intra - inter)


def order_weights(margin: torch.Tensor, b: float = STEP_ONE_B, tau: float = STEP_ONE_TAU) -> torch.Tensor:
    """Step-1 gate of eq. 7, ``1 / (1 + exp((dS - b) / tau))``, detached.

    margin: (N,) dS = S_preferred - S_rejected of the originals. Returns (N,) weights in (0, 1), decreasing in dS.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}.")
    return torch.sigmoid(-(margin.detach() - b) / tau)


def margin_weights(margin: torch.Tensor) -> torch.Tensor:
    """Step-2 weights of eq. 8, ``exp(dS_j) / sum_i exp(dS_i)`` over the mini-batch, detached.

    margin: (N,) dS of the originals. Returns (N,) weights summing to 1, increasing in dS.
    """
    return torch.softmax(margin.detach(), dim=0)


def step_one_steps(total_steps: int, fraction: float = STEP_ONE_FRACTION) -> int:
    """How many of ``total_steps`` optimiser steps use step 1 (eq. 7); the rest use step 2 (eq. 8)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"The step-1 fraction must be in [0, 1], got {fraction}.")
    return int(round(fraction * total_steps))


def phase_for_step(step: int, total_steps: int, fraction: float = STEP_ONE_FRACTION) -> int:
    """1 for the first ``step_one_steps(total_steps, fraction)`` optimiser steps (0-based ``step``), else 2."""
    return 1 if step < step_one_steps(total_steps, fraction) else 2


@dataclass(frozen=True)
class StablePreferenceLoss:
    """One evaluation of the two-step loss. loss: scalar to minimise; preference, anti_interference, weights,
    margin: (N,) per-pair L_pref, L_ai (zeros when not used), detached pair weights, and dS (detached)."""

    loss: torch.Tensor
    preference: torch.Tensor
    anti_interference: torch.Tensor
    weights: torch.Tensor
    margin: torch.Tensor


def stable_preference_loss(
    preferred: torch.Tensor,
    rejected: torch.Tensor,
    preferred_views: torch.Tensor | None,
    rejected_views: torch.Tensor | None,
    phase: int,
    b: float = STEP_ONE_B,
    tau: float = STEP_ONE_TAU,
) -> StablePreferenceLoss:
    """The Stable Preference objective for one mini-batch (eq. 7 in phase 1, eq. 8 in phase 2).

    preferred, rejected: (N,) logit-scale scores of the originals; preferred_views, rejected_views: (N, k) scores of
    the weak views, or None to leave L_ai out (the "L_ai off" ablation of Table 2). Per pair
    ``L_j = L_pref_j + L_ai_j``. Phase 1: ``loss = mean_j L_j / (1 + exp((dS_j - b) / tau))``. Phase 2:
    ``loss = sum_j softmax(dS)_j L_j`` (the weights sum to 1, so a uniform batch gives the mean). Weights are
    detached (module docstring).
    """
    pref = preference_loss(preferred, rejected)  # (N,)
    if preferred_views is None or rejected_views is None:
        anti = torch.zeros_like(pref)
    else:
        anti = anti_interference_loss(preferred, rejected, preferred_views, rejected_views)  # (N,)
    margin = (preferred - rejected).detach()  # (N,) dS
    if phase == 1:
        weights = order_weights(margin, b, tau)
        loss = (weights * (pref + anti)).mean()
    elif phase == 2:
        weights = margin_weights(margin)
        loss = (weights * (pref + anti)).sum()
    else:
        raise ValueError(f"phase must be 1 (order correction, eq. 7) or 2 (margin, eq. 8), got {phase!r}.")
    return StablePreferenceLoss(loss, pref, anti, weights, margin)


# ------------------------------------------------------------------------------------------------ augmentation
def _crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of torchvision's RandomResizedCrop.get_params, drawn from ``generator``:
    10 tries of a random area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, then a central crop
    clamped to ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        draws = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def weak_augment(
    images: torch.Tensor,
    views: int = AUGMENTATIONS,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    flip_probability: float = 0.5,
) -> torch.Tensor:
    """k independent weak views per image for L_ai (sec. 3.2 and 4.2): a random resized crop (area fraction in
    ``scale``, aspect ratio in ``ratio``) resized back to the input size (bilinear, antialiased), then a horizontal
    flip with probability ``flip_probability``. Not differentiable in the crop parameters (none are needed).

    images: (B, C, H, W) float (pixel values or normalised: crop, resize and flip commute with a per-channel
    normalisation); generator: a CPU ``torch.Generator`` for reproducible draws (None: torch's global RNG).
    Returns (B, views, C, H, W) on the images' device and dtype.
    """
    if images.ndim != 4:
        raise ValueError(f"Expected images of shape (B, C, H, W), got {tuple(images.shape)}.")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"The crop scale must satisfy 0 < low <= high <= 1, got {scale}.")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"The crop aspect ratio must satisfy 0 < low <= high, got {ratio}.")
    batch, _, height, width = images.shape
    out = images.new_empty((batch, views) + tuple(images.shape[1:]))
    for index in range(batch):
        for view in range(views):
            top, left, crop_h, crop_w = _crop_box(height, width, scale, ratio, generator)
            crop = images[index : index + 1, :, top : top + crop_h, left : left + crop_w]  # (1, C, h, w)
            if (crop_h, crop_w) != (height, width):
                crop = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
            if float(torch.rand((), generator=generator)) < flip_probability:
                crop = crop.flip(-1)
            out[index, view] = crop[0]
    return out
