"""RankDPO: the per-image diffusion score, the DCG pair weights and the ranking loss (rankdpo.txt sec. 3.3, eq. 5-7,
Algorithm 2 in appendix A.6; METHODS.md section 4), and pairwise Diffusion-DPO as its k = 2, Delta = 1 case.

Notation, for the k images of one prompt (a *group*):
- ``phi``: (k,) Syn-Pic win rates in [0, 1] (``core/reward_aggregation.syn_pic_win_rates``); image i is *preferred*
  over image j when ``phi_i > phi_j`` (equal win rates make no pair).
- ``s``: (k,) diffusion scores, eq. 5: ``s_i = ||eps - eps_theta(x_t^i, t, c)||^2 - ||eps - eps_ref(x_t^i, t, c)||^2``
  with the same t and eps for all k images. A *lower* s means the trained model denoises image i better than the
  reference does, i.e. it moved towards image i: preferred images should get lower s.

Scale conventions (documented because beta depends on them). The squared norms are *means* over the latent
elements (C * h * w), as Diffusion-DPO's reference implementation computes them (``mse_loss(...).mean([1, 2, 3])``).
The loss is ``-log sigmoid(-beta (s_i - s_j))``; Diffusion-DPO writes ``-log sigmoid(-0.5 beta_dpo (...))``, so
this module's ``beta`` equals ``0.5 * beta_dpo``: Diffusion-DPO's SD1.5 / SDXL setting beta_dpo = 5000 is
``beta = 2500`` here (:data:`DEFAULT_BETA`).

Ranks for the discount (eq. 6). METHODS.md resolves the paper's two readings (sec. 3.3 and Fig. 2 rank by the
current model, Algorithm 2 sorts by phi) in favour of the text: ``tau_i`` is the rank of image i by the *current*
scores ``s`` (rank 1 = lowest s = the image the model currently prefers most), so a pair the model orders badly at
the top of its ranking weighs more. The discount is ``D(tau) = log(1 + tau)`` with the natural logarithm as written;
DCG's usual log2 would multiply every weight by the constant ln 2, i.e. only rescale the learning rate. The weights
are constants for the gradient (ranks are piecewise constant in s; ``s`` is detached before ranking). The other
reading, Algorithm 2's (``tau`` = the rank by the labels phi, 1 = highest phi), is available as ``ranks="labels"``:
the weights are then fixed per prompt and largest for the pairs at the top of the true ranking.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_BETA = 2500.0  # = 0.5 * Diffusion-DPO's beta_dpo 5000 (module docstring)
WEIGHTINGS = ("dcg", "uniform")
DISCOUNT_RANKS = ("model", "labels")  # what tau of eq. 6 ranks by: the current scores s (default) or the labels phi


def denoising_errors(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """Per-image squared error ``||target - prediction||^2`` as a *mean* over the non-batch elements (eq. 5's norms,
    Diffusion-DPO's scale).

    target, prediction: (N, C, h, w) (any trailing shape) in the model's prediction space (eps, or v for
    v-prediction models). Returns (N,) float32, >= 0.
    """
    if target.shape != prediction.shape:
        raise ValueError(f"target {tuple(target.shape)} and prediction {tuple(prediction.shape)} differ in shape.")
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def diffusion_scores(policy_errors: torch.Tensor, reference_errors: torch.Tensor) -> torch.Tensor:
    """Eq. 5: ``s_i = policy_error_i - reference_error_i`` (lower = the trained model prefers image i more than the
    reference does). policy_errors, reference_errors: (...,) from :func:`denoising_errors`. Returns the same shape."""
    if policy_errors.shape != reference_errors.shape:
        raise ValueError(f"policy {tuple(policy_errors.shape)} and reference {tuple(reference_errors.shape)} errors "
                         f"differ in shape.")
    return policy_errors - reference_errors.detach()


def current_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each image by the current scores, 1 = lowest s (most preferred by the model); ties keep index order.

    scores: (k,) or (P, k). Returns int64 of the same shape, values 1..k."""
    order = torch.sort(scores.detach(), dim=-1, stable=True).indices  # image indices, best first
    ranks = torch.empty_like(order)
    positions = torch.arange(1, scores.shape[-1] + 1, device=scores.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def label_ranks(win_rates: torch.Tensor) -> torch.Tensor:
    """Rank of each image by its label, 1 = highest phi (Algorithm 2's sort); ties keep index order.

    win_rates: (k,) or (P, k). Returns int64 of the same shape, values 1..k."""
    return current_ranks(-win_rates.float())


def dcg_weights(win_rates: torch.Tensor, scores: torch.Tensor, ranks: str = "model") -> torch.Tensor:
    """Eq. 6: ``Delta_ij = |G_i - G_j| * |1 / D(tau_i) - 1 / D(tau_j)|`` with gain ``G = 2^phi - 1`` and discount
    ``D(tau) = log(1 + tau)``, tau the rank by the current scores (:func:`current_ranks`, ``ranks="model"``) or by
    the labels (:func:`label_ranks`, ``ranks="labels"``, Algorithm 2's reading).

    win_rates: (k,) or (P, k) phi in [0, 1]; scores: the same shape, the current s (detached here).
    Returns (k, k) or (P, k, k) float32 weights, symmetric, >= 0, zero on the diagonal.
    """
    if win_rates.shape != scores.shape:
        raise ValueError(f"win_rates {tuple(win_rates.shape)} and scores {tuple(scores.shape)} differ in shape.")
    if ranks not in DISCOUNT_RANKS:
        raise ValueError(f"ranks must be one of {DISCOUNT_RANKS}, got {ranks!r}.")
    gain = torch.pow(2.0, win_rates.float()) - 1.0
    tau = current_ranks(scores) if ranks == "model" else label_ranks(win_rates)
    inverse_discount = 1.0 / torch.log1p(tau.float())
    return ((gain.unsqueeze(-1) - gain.unsqueeze(-2)).abs()
            * (inverse_discount.unsqueeze(-1) - inverse_discount.unsqueeze(-2)).abs())


def preferred_pairs(win_rates: torch.Tensor) -> torch.Tensor:
    """``mask[..., i, j] = phi_i > phi_j`` (image i preferred over j). win_rates: (k,) or (P, k) -> bool (.., k, k)."""
    return win_rates.unsqueeze(-1) > win_rates.unsqueeze(-2)


def rankdpo_loss(scores: torch.Tensor, win_rates: torch.Tensor, beta: float = DEFAULT_BETA,
                 weighting: str = "dcg", ranks: str = "model") -> torch.Tensor:
    """Eq. 7 for one or several prompt groups: ``L = -sum_{i preferred over j} Delta_ij log sigmoid(-beta (s_i - s_j))``.

    scores: (k,) or (P, k) diffusion scores s (eq. 5), differentiable; win_rates: the same shape, phi in [0, 1].
    beta: > 0, in this module's scale (module docstring). weighting: "dcg" (Delta of eq. 6) or "uniform"
    (Delta = 1 for every preferred pair; with k = 2 this is pairwise Diffusion-DPO, :func:`diffusion_dpo_loss`).
    ranks: what eq. 6's discount ranks by, "model" (the current s) or "labels" (phi); see :func:`dcg_weights`.
    Returns the sum over the pairs of each group, averaged over the P groups: a scalar. A group whose win rates are
    all equal contributes 0.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}.")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    if scores.shape != win_rates.shape or scores.dim() not in (1, 2) or scores.shape[-1] < 2:
        raise ValueError(f"scores {tuple(scores.shape)} and win_rates {tuple(win_rates.shape)} must both be (k,) or "
                         f"(P, k) with k >= 2.")
    groups_scores = scores.reshape(-1, scores.shape[-1])
    groups_rates = win_rates.reshape(-1, win_rates.shape[-1]).to(groups_scores.device)
    pairs = preferred_pairs(groups_rates).float()  # (P, k, k)
    weights = dcg_weights(groups_rates, groups_scores, ranks) if weighting == "dcg" else torch.ones_like(pairs)
    margins = groups_scores.unsqueeze(-1) - groups_scores.unsqueeze(-2)  # s_i - s_j, (P, k, k)
    pair_losses = -F.logsigmoid(-beta * margins.float())
    return (pairs * weights * pair_losses).sum(dim=(-1, -2)).mean()


def diffusion_dpo_loss(preferred_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       beta: float = DEFAULT_BETA) -> torch.Tensor:
    """Pairwise Diffusion-DPO (rankdpo.txt eq. 4, Wallace et al. 2024): ``-log sigmoid(-beta (s_w - s_l))`` averaged
    over the N pairs. preferred_scores, rejected_scores: (N,) diffusion scores (eq. 5). Returns a scalar.

    It is :func:`rankdpo_loss` with k = 2 and Delta = 1 (``weighting="uniform"``), tested as such."""
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}.")
    return -F.logsigmoid(-beta * (preferred_scores - rejected_scores).float()).mean()


def implicit_accuracy(scores, win_rates) -> torch.Tensor:
    """Fraction of preferred pairs the model orders right (``s_i < s_j`` when i is preferred over j), pooled over
    all groups: a training statistic. scores, win_rates: (P, k) tensors, or equal-length sequences of (k_p,) tensors
    for groups of different sizes. Returns a scalar in [0, 1] (NaN when no group has a preferred pair)."""
    if isinstance(scores, torch.Tensor):
        groups = [(scores.reshape(-1, scores.shape[-1]), win_rates.reshape(-1, win_rates.shape[-1]))]
    else:
        groups = [(group_scores.reshape(1, -1), group_rates.reshape(1, -1))
                  for group_scores, group_rates in zip(scores, win_rates, strict=True)]
    right = total = torch.zeros(())
    for group_scores, group_rates in groups:  # (G, k) each
        pairs = preferred_pairs(group_rates.to(group_scores.device))  # (G, k, k)
        group_scores = group_scores.detach()
        right = right + ((group_scores.unsqueeze(-1) < group_scores.unsqueeze(-2)) & pairs).sum().cpu()
        total = total + pairs.sum().cpu()
    return right / total
