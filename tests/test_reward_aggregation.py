"""Reward aggregation (rankdpo.txt, Syn-Pic; METHODS.md 4) against hand computations on small inputs."""

from __future__ import annotations


import pytest
import torch
from comfyui_refinery.core.reward_aggregation import (
    rank_order,
    ranks,
    select_best,
    syn_pic_win_rates,
)

# 3 images of one prompt, 2 rewards, written out by hand:
#   reward 1: 0.9 > 0.5 > 0.1  -> image 0 beats 1 and 2, image 1 beats 2         wins (2, 1, 0)
#   reward 2: 0.2 < 0.4 < 0.7  -> image 1 beats 0 and 2, image 2 beats 0         wins (0, 2, 1)
#   total wins (2, 3, 1) over n (k - 1) = 2 * 2 = 4 comparisons per image -> phi = (0.5, 0.75, 0.25)
TWO_REWARDS = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.7, 0.4]])
TWO_REWARDS_PHI = torch.tensor([0.5, 0.75, 0.25])


def test_win_rates_of_two_rewards_by_hand():
    torch.testing.assert_close(syn_pic_win_rates(TWO_REWARDS), TWO_REWARDS_PHI)
    assert rank_order(TWO_REWARDS_PHI).tolist() == [1, 0, 2]  # best first
    assert ranks(TWO_REWARDS_PHI).tolist() == [2, 1, 3]  # tau(i), 1 = best


def test_ties_count_half_by_default_and_nothing_in_algorithm_1():
    scores = torch.tensor([[1.0, 1.0, 0.0]])  # one reward; images 0 and 1 tie, both beat image 2
    # half a win each for the tie: wins (1.5, 1.5, 0) over 1 * 2 comparisons
    torch.testing.assert_close(syn_pic_win_rates(scores), torch.tensor([0.75, 0.75, 0.0]))
    # Algorithm 1 counts strict wins only: (1, 1, 0) / 2
    torch.testing.assert_close(syn_pic_win_rates(scores, tie_credit=0.0), torch.tensor([0.5, 0.5, 0.0]))


def test_win_rates_sum_to_half_the_images_and_lie_in_unit_interval():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (5, 4, 6), generator=generator).float()  # many ties
    phi = syn_pic_win_rates(scores)
    assert phi.shape == (5, 6)
    torch.testing.assert_close(phi.sum(dim=-1), torch.full((5,), 6 / 2))
    assert phi.min() >= 0 and phi.max() <= 1


def test_batched_over_prompts_equals_one_prompt_at_a_time():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 3, 5, generator=generator)  # (P, n, k)
    batched = syn_pic_win_rates(scores)
    for prompt in range(4):
        torch.testing.assert_close(batched[prompt], syn_pic_win_rates(scores[prompt]))


def test_single_reward_pair_is_a_plain_preference():
    torch.testing.assert_close(syn_pic_win_rates(torch.tensor([0.3, 0.8])), torch.tensor([0.0, 1.0]))


def test_win_rate_errors():
    with pytest.raises(ValueError, match="at least 2 images"):
        syn_pic_win_rates(torch.tensor([[0.5]]))
    with pytest.raises(ValueError, match="NaN"):
        syn_pic_win_rates(torch.tensor([[0.5, float("nan")]]))
    with pytest.raises(ValueError, match=r"\(P, n, k\)"):
        syn_pic_win_rates(torch.zeros(1, 1, 2, 2))


def test_ranks_break_ties_by_index():
    assert ranks(torch.tensor([0.5, 0.9, 0.5, 0.1])).tolist() == [2, 1, 3, 4]
    assert ranks(torch.tensor([[0.0, 1.0], [1.0, 0.0]])).tolist() == [[2, 1], [1, 2]]


def test_select_best_by_hand():
    assert select_best(torch.tensor([0.2, 0.9, 0.5, 0.9]), 2).tolist() == [1, 3]  # tie: lower index first
    assert select_best(torch.tensor([[0.2, 0.9, 0.5], [3.0, 1.0, 2.0]]), 1).tolist() == [[1], [0]]
    with pytest.raises(ValueError, match="between 1 and 3"):
        select_best(torch.tensor([0.2, 0.9, 0.5]), 4)
    with pytest.raises(ValueError, match="between 1 and 3"):
        select_best(torch.tensor([0.2, 0.9, 0.5]), 0)
