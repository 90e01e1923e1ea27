"""Aggregating the scores of several reward models into per-prompt rankings (rankdpo.txt, Syn-Pic; METHODS.md 4).

Syn-Pic (rankdpo.txt sec. 3.2 and Algorithm 1 "DataGen", appendix A.6): for one prompt, k images are scored by n
reward models; image i wins against image j on reward l when ``R_i^l > R_j^l``, and its win rate is

    phi_i = wins_i / (n (k - 1))        in [0, 1]

the probability that image i is preferred over another image of the prompt, averaged over rewards and opponents. The
images are ranked by decreasing phi (the target ranking tau of RankDPO, rank 1 = best), and ``phi`` is also the gain
``G_i = 2^phi_i - 1`` of RankDPO's DCG weights.

Ties. Algorithm 1 counts only strict wins, so two equal scores both lose and the phi of a prompt no longer sum to
k / 2. We count a tie as half a win for both images (``tie_credit = 0.5``): phi then stays a proper average
preference probability (``sum_i phi_i = k / 2`` for every prompt), and swapping two tied images changes nothing.
``tie_credit = 0`` reproduces Algorithm 1 literally. Reward scores are continuous, so ties are rare in practice.

Shapes: n = number of rewards, k = images per prompt, P = prompts, B = images in a batch.
"""

from __future__ import annotations

import torch

TIE_CREDIT = 0.5


def _check_finite(scores: torch.Tensor, what: str) -> None:
    if not torch.isfinite(scores).all():
        raise ValueError(f"{what} contain NaN or infinite values; a reward model failed on some image. Rescore it.")


def syn_pic_win_rates(scores: torch.Tensor, tie_credit: float = TIE_CREDIT) -> torch.Tensor:
    """Syn-Pic win rates ``phi_i = wins_i / (n (k - 1))`` (rankdpo.txt, Syn-Pic, Algorithm 1).

    scores: (n, k) reward scores of the k images of one prompt under n rewards (higher = better), or (P, n, k) for P
    prompts at once; a single reward may be given as (k,). tie_credit: what an equal score counts (0.5 = half a
    win, module docstring; 0 = Algorithm 1's strict wins). Returns phi: (k,) or (P, k) float in [0, 1].
    Raises ValueError for fewer than 2 images, no rewards, or non-finite scores.
    """
    scores = torch.as_tensor(scores)
    if scores.ndim == 1:
        scores = scores.unsqueeze(0)  # (k,) -> (1, k): one reward
    if scores.ndim not in (2, 3):
        raise ValueError(f"Scores must be (k,), (n, k) or (P, n, k), got shape {tuple(scores.shape)}.")
    rewards, images = scores.shape[-2], scores.shape[-1]
    if images < 2:
        raise ValueError(f"Win rates need at least 2 images per prompt to compare, got k = {images}.")
    if rewards < 1:
        raise ValueError("Win rates need at least one reward's scores, got n = 0.")
    _check_finite(scores, "Scores")
    scores = scores.double()
    difference = scores.unsqueeze(-1) - scores.unsqueeze(-2)  # (..., n, k, k): [i, j] = R_i - R_j
    outcome = (difference > 0).double() + tie_credit * (difference == 0).double()  # 1 win, tie_credit tie, 0 loss
    not_self = 1.0 - torch.eye(images, dtype=outcome.dtype, device=outcome.device)  # an image does not play itself
    outcome = outcome * not_self
    wins = outcome.sum(dim=(-3, -1))  # (..., k): over rewards and opponents
    return (wins / (rewards * (images - 1))).float()


def rank_order(values: torch.Tensor) -> torch.Tensor:
    """Indices that sort ``values`` best-first along the last axis: (..., k) -> (..., k) int64.

    Higher = better; ties keep the lower index first (stable), so equal images keep their given order.
    """
    return torch.argsort(torch.as_tensor(values), dim=-1, descending=True, stable=True)


def ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based rank of every image, tau(i) of rankdpo.txt sec. 3.3 (1 = best): (..., k) -> (..., k) int64.

    Ties are broken as :func:`rank_order` does (lower index ranks first), so ranks are a permutation of 1..k.
    """
    order = rank_order(values)
    positions = torch.arange(1, order.shape[-1] + 1, device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def select_best(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, best first: (B,) -> (k,), or per row (P, B) -> (P, k). Ties keep the
    lower index first. Raises ValueError unless 1 <= k <= B."""
    scores = torch.as_tensor(scores)
    if scores.ndim not in (1, 2):
        raise ValueError(f"select_best takes scores of shape (B,) or (P, B), got {tuple(scores.shape)}.")
    available = scores.shape[-1]
    if not 1 <= int(k) <= available:
        raise ValueError(f"Cannot select the best {k} of {available} images: k must be between 1 and {available}.")
    _check_finite(scores, "Scores")
    return rank_order(scores)[..., : int(k)]
