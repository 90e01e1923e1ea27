"""Focus-N-Fix (focus-n-fix.txt, METHODS.md 2): the regional constraint, the objective, and the region function M.

- :func:`regional_constraint`: ``|| (1 - M(I_0)) (.) (I_0 - I_hat) ||_F`` per image (eq. 2, "Regional constraint").
- :func:`objective`: ``J = r(I_hat, c) - beta * constraint`` per image (eq. 2; Algorithm 1 line 11). beta 0 is plain
  DRaFT (eq. 1).
- The region function ``M(I_0)`` (sec. 3.2 and 4.1), never differentiated: a heatmap of the problematic regions,
  from (a) our G-Refine maps (:func:`quality_map_heatmap`: ``1 - P + A``, the same defect map as the refiner's) or
  (b) the gradient saliency ``|dr/dI|`` of any differentiable reward (:func:`saliency_heatmap`, Simonyan et al.);
  then :func:`region_mask`: Gaussian smoothing (kernel 16, sigma 4 at 512 px, scaled with the resolution),
  threshold, keep the main connected regions, dilate (``core/masks.py`` does each step).

Conventions: images are ``(B, H, W, C)`` float in [0, 1]; heatmaps and masks ``(B, H, W)``; mask 1 = a problematic
region that may change, 0 = keep as the reference.

Empty and full masks (documented behaviour, the trainer warns): an *empty* mask (no pixel above the threshold: the
region function found nothing to fix) makes the constraint cover the whole image, so that image is kept as the
reference as far as beta allows; a *full* mask removes the constraint for that image, which then trains as plain
DRaFT (the paper's own reading of an all-ones mask, sec. 5 "Non-Localizable quality aspects").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import masks

REFERENCE_RESOLUTION = 512  # the paper's pixel sizes (kernel 16, sigma 4) are given at 512 px
NORMALIZATIONS = ("peak", "none")
MASK_STATES = ("ok", "empty", "full")


# ------------------------------------------------------------------------------------------------ eq. 2
def _check_images(name: str, images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a (B, H, W, C) tensor with B >= 1, got {got}.")


def regional_constraint(reference: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The regional constraint of focus-n-fix.txt eq. 2, ``|| (1 - M(I_0)) (.) (I_0 - I_hat) ||_F``, per image.

    reference I_0 and generated I_hat: (B, H, W, C) float in [0, 1], the same x_T and prompt; mask M(I_0): (B, H, W)
    in [0, 1] (1 = problematic region, free to change). The mask and the reference get no gradient (METHODS.md 2);
    the result is differentiable in ``generated``. The Frobenius norm runs over H, W and C.
    Returns (B,) float >= 0. At ``generated == reference`` its gradient is 0 (the subgradient torch picks).
    """
    _check_images("reference", reference)
    _check_images("generated", generated)
    if reference.shape != generated.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and generated {tuple(generated.shape)} must have the "
                         f"same shape (same prompt, noise and resolution).")
    if mask.shape != reference.shape[:3]:
        raise ValueError(f"mask must be (B, H, W) = {tuple(reference.shape[:3])}, got {tuple(mask.shape)}.")
    keep = (1.0 - mask.detach().to(generated.dtype)).unsqueeze(-1)  # (B, H, W, 1)
    difference = keep * (reference.detach().to(generated.dtype) - generated)  # (B, H, W, C)
    return torch.linalg.vector_norm(difference.flatten(1), ord=2, dim=1)  # (B,)


def objective(reward: torch.Tensor, constraint: torch.Tensor, beta: float) -> torch.Tensor:
    """Focus-N-Fix's objective (focus-n-fix.txt eq. 2, Algorithm 1 line 11), to be *maximised*:
    ``J = r(I_hat, c) - beta * || (1 - M(I_0)) (.) (I_0 - I_hat) ||_F``.

    reward: (B,) r(I_hat, c); constraint: (B,) from :func:`regional_constraint`; beta >= 0 (0: DRaFT, eq. 1).
    Returns (B,); a trainer minimises ``-J.mean()``.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0 (0 = plain DRaFT), got {beta!r}.")
    if reward.shape != constraint.shape or reward.dim() != 1:
        raise ValueError(f"reward {tuple(reward.shape)} and constraint {tuple(constraint.shape)} must both be (B,).")
    return reward - beta * constraint


# ------------------------------------------------------------------------------------------------ region function
@dataclass(frozen=True)
class RegionSettings:
    """Post-processing of a heatmap into the mask M (focus-n-fix.txt sec. 4.1).

    smoothing_kernel / smoothing_sigma: the Gaussian's size and sigma in pixels *at 512 px* (paper: 16 and 4),
    scaled to the image (:func:`core.masks.scale_to_resolution`); 0 sigma = no smoothing.
    normalization: "peak" divides each smoothed heatmap by its maximum, so ``threshold`` is a fraction of the peak
    (for saliency, whose scale is the reward's); "none" thresholds the values as they are (for maps in [0, 1]).
    threshold in [0, 1]: pixels above it are problematic. max_regions >= 1: keep that many largest connected regions
    (0 keeps all). dilation: radius in pixels at 512 px, relaxes the mask (0 = none).
    """

    smoothing_kernel: int = 16
    smoothing_sigma: float = 4.0
    normalization: str = "peak"
    threshold: float = 0.3
    max_regions: int = 3
    dilation: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.smoothing_kernel, bool) or not isinstance(self.smoothing_kernel, int) \
                or self.smoothing_kernel < 1:
            raise ValueError(f"smoothing_kernel must be an int >= 1 (pixels at 512 px), got {self.smoothing_kernel!r}.")
        if not (math.isfinite(self.smoothing_sigma) and self.smoothing_sigma >= 0):
            raise ValueError(f"smoothing_sigma must be >= 0, got {self.smoothing_sigma!r}.")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}.")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}.")
        for name in ("max_regions", "dilation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0 = skip this step), got {value!r}.")


def smoothing_for(settings: RegionSettings, height: int, width: int) -> tuple[int, float, int]:
    """(kernel size, sigma, dilation radius) in pixels of a ``height`` x ``width`` image, scaled from 512 px;
    the kernel and radius are rounded (kernel >= 1)."""
    kernel = max(1, round(masks.scale_to_resolution(settings.smoothing_kernel, height, width, REFERENCE_RESOLUTION)))
    sigma = masks.scale_to_resolution(settings.smoothing_sigma, height, width, REFERENCE_RESOLUTION)
    radius = round(masks.scale_to_resolution(settings.dilation, height, width, REFERENCE_RESOLUTION))
    return kernel, sigma, radius


@torch.no_grad()
def region_mask(heatmap: torch.Tensor, settings: RegionSettings = RegionSettings()) -> tuple[torch.Tensor, list[str]]:
    """M of focus-n-fix.txt sec. 3.2 / 4.1 from a heatmap: Gaussian smoothing -> (peak normalisation) -> threshold
    -> keep the main connected regions -> dilate.

    heatmap: (B, H, W) float >= 0 (larger = more problematic), any scale when ``settings.normalization == "peak"``,
    in [0, 1] otherwise. Returns ``(mask (B, H, W) float 0/1 on the heatmap's device, states)``: one of
    "ok" / "empty" / "full" per image (see the module docstring for what empty and full masks do). An all-zero
    heatmap gives an empty mask.
    """
    values = heatmap.detach().float()
    if values.dim() != 3 or values.numel() == 0:
        raise ValueError(f"heatmap must be (B, H, W), got {tuple(values.shape)}.")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("heatmap contains NaN or inf; check the reward or the map model (run it in float32).")
    if bool((values < 0).any()):
        raise ValueError("heatmap must be >= 0 (larger = more problematic); pass |saliency| or a defect map.")
    height, width = values.shape[1:]
    kernel, sigma, radius = smoothing_for(settings, height, width)
    smoothed = masks.gaussian_blur(values, sigma, kernel) if sigma > 0 else values  # (B, H, W)
    if settings.normalization == "peak":
        peak = smoothed.flatten(1).amax(dim=1).view(-1, 1, 1)
        smoothed = torch.where(peak > 0, smoothed / peak.clamp_min(torch.finfo(smoothed.dtype).tiny),
                               torch.zeros_like(smoothed))
    mask = (smoothed > settings.threshold).float()
    if settings.max_regions > 0:
        mask = masks.keep_largest_regions(mask, settings.max_regions)
    if radius > 0:
        mask = masks.dilate(mask, radius)
    covered = mask.flatten(1).mean(dim=1)
    states = ["empty" if float(c) == 0.0 else "full" if float(c) == 1.0 else "ok" for c in covered]
    return mask.to(heatmap.device), states


def saliency_heatmap(reward: Callable[[torch.Tensor, Sequence[str]], torch.Tensor], images: torch.Tensor,
                     prompts: Sequence[str]) -> torch.Tensor:
    """Gradient saliency (Simonyan et al., focus-n-fix.txt sec. 4.1): ``max_c |d r(I, c) / d I|`` per pixel.

    reward: a differentiable ``(images (B, H, W, 3) in [0, 1], prompts) -> (B,)`` callable (e.g.
    ``lambda x, p: model.score(x, p, differentiable=True)``); images: (B, H, W, 3) in [0, 1]; prompts: B strings.
    Each image's gradient is its own (the scores are summed; images do not interact). Returns (B, H, W) float >= 0
    without gradient. Raises :class:`NotDifferentiableError` when the reward gives no gradient.
    """
    _check_images("images", images)
    with torch.enable_grad():
        probe = images.detach().float().clone().requires_grad_(True)
        scores = reward(probe, list(prompts))
        if not isinstance(scores, torch.Tensor) or not scores.requires_grad:
            raise NotDifferentiableError("the reward returned a score without gradient for the saliency map")
        (gradient,) = torch.autograd.grad(scores.sum(), probe, allow_unused=True)
    if gradient is None:
        raise NotDifferentiableError("the reward's score does not depend on the image pixels")
    return gradient.abs().amax(dim=-1).detach()  # (B, H, W)


@torch.no_grad()
def quality_map_heatmap(perceptual_map: torch.Tensor, alignment_map: torch.Tensor | None = None) -> torch.Tensor:
    """Region heatmap from G-Refine's maps (option (a) of the issue; the same defect map as the refiner's
    ``1 - P + A``, g-refine.txt eq. 9 inside Bi): perceptual_map P (B, H, W) in [0, 1] (1 = good), alignment_map A
    (B, H, W) in [0, 1] (1 = must change) or None (then 1 - P). Returns (B, H, W) in [0, 1]; use it with
    ``RegionSettings(normalization="none")``."""
    if alignment_map is None:
        alignment_map = torch.zeros_like(perceptual_map)
    return masks.defect_map(perceptual_map, alignment_map)


class NotDifferentiableError(ValueError):
    """A reward whose score carries no gradient to the image (Focus-N-Fix / DRaFT backpropagate through it)."""


def check_differentiable(reward: Callable[[torch.Tensor, Sequence[str]], torch.Tensor], name: str,
                         resolution: int = 32, device: torch.device | str = "cpu") -> None:
    """Probe ``reward`` on one grey (1, resolution, resolution, 3) image: raise :class:`NotDifferentiableError`
    naming ``name`` when the score has no gradient with respect to the pixels (a detached or thresholded score, a
    no_grad forward, a non-torch model), before any long work."""
    probe = torch.full((1, resolution, resolution, 3), 0.5, device=device, requires_grad=True)
    try:
        with torch.enable_grad():
            score = reward(probe, ["a photo"])
            if not isinstance(score, torch.Tensor) or not score.requires_grad:
                raise NotDifferentiableError("its score carries no gradient")
            (gradient,) = torch.autograd.grad(score.float().sum(), probe, allow_unused=True)
        if gradient is None:
            raise NotDifferentiableError("its score does not depend on the pixels")
    except NotDifferentiableError as error:
        raise NotDifferentiableError(
            f"The reward '{name}' is not differentiable ({error}): Focus-N-Fix / DRaFT backpropagate the reward "
            f"into the model. Use a reward that keeps the autograd graph (every loader of core/rewards does when "
            f"called with differentiable=True), or a classifier whose score is computed with torch ops."
        ) from None
