"""The keep-better guard (core/keep_better.py) against hand computations."""

from __future__ import annotations

import pytest
import torch

from comfyui_refinery.core.keep_better import (
    GuardScores,
    GuardSettings,
    choose_attempts,
    guard_table,
    passes_guard,
    score_gain,
)


def scores(p, a, r=None) -> GuardScores:
    return GuardScores(torch.tensor(p), torch.tensor(a), None if r is None else torch.tensor(r))


def test_gain_by_hand_without_and_with_a_reward():
    before, after = scores([0.5, 0.8], [0.6, 1.0]), scores([0.7, 0.7], [0.5, 1.0])
    # picture 0: (0.2 - 0.1) / 2 = 0.05; picture 1: (-0.1 + 0) / 2 = -0.05
    torch.testing.assert_close(score_gain(before, after), torch.tensor([0.05, -0.05], dtype=torch.float64))
    # rewards 20 -> 21 (+5 %) and 0.8 -> 0.6 (-25 %), weight 2: 0.05 + 0.1 and -0.05 - 0.5
    before_r, after_r = scores([0.5, 0.8], [0.6, 1.0], [20.0, 0.8]), scores([0.7, 0.7], [0.5, 1.0], [21.0, 0.6])
    torch.testing.assert_close(score_gain(before_r, after_r, reward_weight=2.0),
                               torch.tensor([0.15, -0.55], dtype=torch.float64))


def test_keep_needs_the_margin_and_no_big_drop_of_p_or_a():
    settings = GuardSettings(margin=0.01, tolerance=0.02)
    before = scores([0.50, 0.50, 0.50, 0.50], [0.50, 0.50, 0.50, 0.50])
    after = scores([0.53, 0.51, 0.70, 0.515], [0.50, 0.50, 0.47, 0.50])
    keep, gain = passes_guard(before, after, settings)
    # gains: 0.015 (kept), 0.005 (< margin), 0.085 but a dropped 0.03 > tolerance, 0.0075 (< margin)
    assert keep.tolist() == [True, False, False, False]
    torch.testing.assert_close(gain, torch.tensor([0.015, 0.005, 0.085, 0.0075], dtype=torch.float64))


def test_a_reward_drop_can_veto_a_map_gain():
    settings = GuardSettings(margin=0.01, tolerance=0.02, reward_weight=1.0)
    before, after = scores([0.5], [0.5], [10.0]), scores([0.54], [0.5], [9.0])  # maps +0.02, reward -10 %
    keep, gain = passes_guard(before, after, settings)
    assert not keep.item() and gain.item() == pytest.approx(0.02 - 0.1)


def test_best_passing_attempt_is_kept_and_failures_report_the_best_gain():
    settings = GuardSettings(margin=0.01, tolerance=0.02)
    before = scores([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    attempts = [
        scores([0.56, 0.40, 0.505], [0.5, 0.5, 0.5]),  # gains 0.03, -0.05 (p drop), 0.0025
        scores([0.60, 0.60, 0.51], [0.5, 0.40, 0.5]),  # gains 0.05, 0.0 (a drop), 0.005
    ]
    decision = choose_attempts(before, attempts, settings)
    assert decision.keep.tolist() == [True, False, False]
    assert decision.attempt.tolist() == [1, -1, -1]
    assert decision.reported.tolist() == [1, 1, 1]  # picture 1: gains -0.05 vs 0.0; picture 2: 0.0025 vs 0.005
    torch.testing.assert_close(decision.gain, torch.tensor([0.05, 0.0, 0.005], dtype=torch.float64))
    table = guard_table(before, attempts, decision)
    rows = table.splitlines()[2:]
    assert rows[0].endswith("| +0.0500 | refined (attempt 2) |")
    assert rows[1].endswith("| input kept (not better) |") and "| 0.600 |" in rows[1]


def test_errors_are_clear():
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        GuardSettings(margin=-0.1)
    with pytest.raises(ValueError, match="three \\(B,\\) tensors of one length"):
        scores([0.5, 0.5], [0.5])
    with pytest.raises(ValueError, match="at least one attempt"):
        choose_attempts(scores([0.5], [0.5]), [], GuardSettings())
    with pytest.raises(ValueError, match="reward, or neither"):
        score_gain(scores([0.5], [0.5], [1.0]), scores([0.5], [0.5]))


def test_attempt_seeds_start_at_the_seed_and_differ_after():
    from comfyui_refinery.core.keep_better import attempt_seed

    assert attempt_seed(42, 0) == 42
    seeds = {attempt_seed(42, attempt) for attempt in range(1, 6)}
    assert len(seeds) == 5 and 42 not in seeds and all(0 <= s <= 0xFFFFFFFFFFFFFFFF for s in seeds)
    assert attempt_seed(42, 3) == attempt_seed(42, 3) and attempt_seed(7, 3, seed_max=9) <= 9


def test_kept_pictures_take_the_kept_attempt_else_the_input():
    from comfyui_refinery.core.keep_better import GuardDecision, kept_pictures

    inputs = torch.zeros(3, 2)
    attempts = [torch.ones(3, 2), torch.full((3, 2), 2.0)]
    decision = GuardDecision(keep=torch.tensor([True, False, True]), attempt=torch.tensor([1, -1, 0]),
                             reported=torch.tensor([1, 0, 0]), gain=torch.zeros(3, dtype=torch.float64))
    chosen = kept_pictures(inputs, attempts, decision)
    assert chosen.tolist() == [[2.0, 2.0], [0.0, 0.0], [1.0, 1.0]] and inputs.abs().sum() == 0
