"""core/rankdpo.py against hand computations (rankdpo.txt eq. 5-7), and the exact Diffusion-DPO reduction."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_refinery.core import rankdpo


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_denoising_errors_and_scores_by_hand():
    target = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # (2, 1, 2, 2)
    prediction = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    errors = rankdpo.denoising_errors(target, prediction)
    assert errors.tolist() == pytest.approx([(1 + 4 + 0 + 1) / 4, 0.25])
    scores = rankdpo.diffusion_scores(errors, torch.tensor([1.0, 0.5]))
    assert scores.tolist() == pytest.approx([0.5, -0.25])
    with pytest.raises(ValueError, match="shape"):
        rankdpo.denoising_errors(target, prediction[:1])


def test_current_ranks_lowest_score_first_ties_in_index_order():
    assert rankdpo.current_ranks(torch.tensor([0.3, -0.1, 0.2])).tolist() == [3, 1, 2]
    assert rankdpo.current_ranks(torch.tensor([[0.0, 0.0, -1.0]])).tolist() == [[2, 3, 1]]


# phi: image 0 best; s: the model currently ranks image 1 first, image 2 second, image 0 last
PHI = [1.0, 0.5, 0.0]
S = [0.3, -0.1, 0.2]


def test_dcg_weights_by_hand():
    # ranks by s: image 0 -> 3, image 1 -> 1, image 2 -> 2; 1/D(tau) = 1/ln(1 + tau)
    inverse_discount = [1 / math.log(4), 1 / math.log(2), 1 / math.log(3)]
    gain = [2**p - 1 for p in PHI]  # 1, sqrt(2) - 1, 0
    expected = [[abs(gain[i] - gain[j]) * abs(inverse_discount[i] - inverse_discount[j]) for j in range(3)]
                for i in range(3)]
    weights = rankdpo.dcg_weights(torch.tensor(PHI), torch.tensor(S))
    assert weights.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]
    assert weights[0, 1].item() == pytest.approx(0.4225556, abs=1e-6)  # (2 - sqrt 2) * (1/ln 2 - 1/ln 4)
    assert weights[0, 2].item() == pytest.approx(0.1888917, abs=1e-6)
    assert weights[1, 2].item() == pytest.approx(0.2205504, abs=1e-6)


def test_dcg_weights_ranked_by_the_labels_by_hand():
    """Algorithm 2's reading: tau by phi (image 0 -> 1, image 1 -> 2, image 2 -> 3), whatever the current scores."""
    inverse_discount = [1 / math.log(2), 1 / math.log(3), 1 / math.log(4)]
    gain = [2**p - 1 for p in PHI]
    expected = [[abs(gain[i] - gain[j]) * abs(inverse_discount[i] - inverse_discount[j]) for j in range(3)]
                for i in range(3)]
    for scores in (S, [0.0, 0.0, 0.0], [-1.0, 0.0, 1.0]):
        weights = rankdpo.dcg_weights(torch.tensor(PHI), torch.tensor(scores), ranks="labels")
        assert weights.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]
    assert weights[0, 2].item() == pytest.approx(1 * (1 / math.log(2) - 1 / math.log(4)), abs=1e-6)
    assert rankdpo.label_ranks(torch.tensor([[0.2, 0.9, 0.2]])).tolist() == [[2, 1, 3]]  # ties: index order
    with pytest.raises(ValueError, match="ranks must be one of"):
        rankdpo.dcg_weights(torch.tensor(PHI), torch.tensor(S), ranks="phi")
    loss = rankdpo.rankdpo_loss(torch.tensor(S), torch.tensor(PHI), beta=3.0, ranks="labels")
    hand = -sum(expected[i][j] * log_sigmoid(-3.0 * (S[i] - S[j])) for i, j in ((0, 1), (0, 2), (1, 2)))
    assert loss.item() == pytest.approx(hand, rel=1e-6)


def test_rankdpo_loss_by_hand():
    beta = 3.0
    weights = rankdpo.dcg_weights(torch.tensor(PHI), torch.tensor(S)).tolist()
    expected = 0.0
    for i in range(3):
        for j in range(3):
            if PHI[i] > PHI[j]:
                expected -= weights[i][j] * log_sigmoid(-beta * (S[i] - S[j]))
    loss = rankdpo.rankdpo_loss(torch.tensor(S), torch.tensor(PHI), beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # groups are averaged: the same group twice gives the same loss; an all-tied group adds 0 before averaging
    two = rankdpo.rankdpo_loss(torch.tensor([S, S]), torch.tensor([PHI, PHI]), beta=beta)
    assert two.item() == pytest.approx(expected, rel=1e-6)
    tied = rankdpo.rankdpo_loss(torch.tensor([S, S]), torch.tensor([PHI, [0.5, 0.5, 0.5]]), beta=beta)
    assert tied.item() == pytest.approx(expected / 2, rel=1e-6)
    uniform = rankdpo.rankdpo_loss(torch.tensor(S), torch.tensor(PHI), beta=beta, weighting="uniform")
    assert uniform.item() == pytest.approx(-sum(log_sigmoid(-beta * (S[i] - S[j]))
                                               for i, j in ((0, 1), (0, 2), (1, 2))), rel=1e-6)


def test_pairwise_dpo_is_the_k2_uniform_case_exactly():
    generator = torch.Generator().manual_seed(0)
    preferred, rejected = torch.randn(8, generator=generator) * 1e-3, torch.randn(8, generator=generator) * 1e-3
    dpo = rankdpo.diffusion_dpo_loss(preferred, rejected, beta=2500.0)
    expected = sum(-log_sigmoid(-2500.0 * (w - l)) for w, l in zip(preferred.tolist(), rejected.tolist())) / 8
    assert dpo.item() == pytest.approx(expected, rel=1e-5)
    scores = torch.stack([preferred, rejected], dim=1)  # (8, 2): image 0 of each group preferred
    win_rates = torch.tensor([[1.0, 0.0]]).expand(8, 2)
    ranked = rankdpo.rankdpo_loss(scores, win_rates, beta=2500.0, weighting="uniform")
    assert torch.equal(ranked, dpo)
    # the order of the two images in a group does not matter
    swapped = rankdpo.rankdpo_loss(scores.flip(1), win_rates.flip(1), beta=2500.0, weighting="uniform")
    assert torch.equal(swapped, dpo)


def test_loss_gradient_lowers_the_preferred_score():
    scores = torch.tensor(S, requires_grad=True)
    rankdpo.rankdpo_loss(scores, torch.tensor(PHI), beta=2.0).backward()
    # gradient descent moves s_0 (best) down, s_2 (worst) up
    assert scores.grad[0] > 0 and scores.grad[2] < 0
    # the weights are constants: the gradient equals the hand derivative with Delta fixed
    weights = rankdpo.dcg_weights(torch.tensor(PHI), torch.tensor(S)).tolist()
    hand = [0.0, 0.0, 0.0]
    for i in range(3):
        for j in range(3):
            if PHI[i] > PHI[j]:
                slope = weights[i][j] * 2.0 * (1 - 1 / (1 + math.exp(2.0 * (S[i] - S[j]))))  # d/dm of -logsig(-2m)
                hand[i] += slope
                hand[j] -= slope
    assert scores.grad.tolist() == pytest.approx(hand, rel=1e-5)


def test_implicit_accuracy():
    accuracy = rankdpo.implicit_accuracy(torch.tensor([S]), torch.tensor([PHI]))
    assert accuracy.item() == pytest.approx(1 / 3)  # only the pair (1, 2) is ordered right


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": 0.0}, "beta must be a positive"),
    ({"beta": -1.0}, "beta must be a positive"),
    ({"beta": float("nan")}, "beta must be a positive"),
    ({"weighting": "ndcg"}, "weighting must be one of"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rankdpo.rankdpo_loss(torch.tensor(S), torch.tensor(PHI), **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="k >= 2"):
        rankdpo.rankdpo_loss(torch.tensor([0.1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="k >= 2"):
        rankdpo.rankdpo_loss(torch.tensor(S), torch.tensor(PHI[:2]))
