"""The keep-better guard: a refined picture replaces its input only when it scores better (G-Refine's "negative
optimisation" made impossible by construction).

G-Refine (g-refine.txt sec. 4) counts the pictures its refiner made worse; a user who drops a refiner into a graph
wants none. After stage 2 the refined picture is scored again with the same quality maps (p from the PQ-Map, a from
the AQ-Map, both probabilities in [0, 1]) and, when one is given, a reward model. With ``d`` the change of a score
from the input picture to the refined one:

    gain = (d p + d a) / 2  +  reward_weight * d r / max(|r_input|, 1e-6)

the reward entering as its *relative* change, so that rewards of any scale (CLIPScore ~0.8, PickScore ~20,
aesthetic 1-10) weigh alike. The refined picture is kept when

    gain >= margin   and   d p >= -tolerance   and   d a >= -tolerance

and otherwise the input comes back bit-identical. With several attempts (the refinement re-run with other seeds)
the passing attempt with the highest gain is kept. A prompt with nothing to align gives a = 1 before and after
(``d a = 0``); the guard then rests on p and the reward.

Shapes: B = pictures; scores are (B,) float tensors (p, a in [0, 1]; rewards on their own scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RELATIVE_FLOOR = 1e-6
"""Below this |r_input| the reward's relative change is taken against this floor (a zero reward has no scale)."""


@dataclass(frozen=True)
class GuardSettings:
    """margin: the least ``gain`` that counts as better (>= 0; 0.01 = one point of p on average); tolerance: how far
    p or a alone may drop (>= 0); reward_weight: weight of the reward's relative change in ``gain`` (>= 0)."""

    margin: float = 0.01
    tolerance: float = 0.02
    reward_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("margin", "tolerance", "reward_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")


@dataclass(frozen=True)
class GuardScores:
    """Scores of B pictures: perceptual p and alignment a (B,) in [0, 1]; reward (B,) or None."""

    perceptual: torch.Tensor
    alignment: torch.Tensor
    reward: torch.Tensor | None = None

    def __post_init__(self) -> None:
        count = self.perceptual.shape
        if self.perceptual.ndim != 1 or self.alignment.shape != count or (
                self.reward is not None and self.reward.shape != count):
            shapes = [tuple(t.shape) for t in (self.perceptual, self.alignment, self.reward) if t is not None]
            raise ValueError(f"Guard scores must be three (B,) tensors of one length, got shapes {shapes}.")


@dataclass(frozen=True)
class GuardDecision:
    """Per picture: keep (B,) bool, True = the refined picture is returned; attempt (B,) int64, the attempt kept
    (0-based), -1 where the input is returned; reported (B,) int64, the attempt whose scores are reported (the one
    kept, else the one with the highest gain); gain (B,) float64, that attempt's gain."""

    keep: torch.Tensor
    attempt: torch.Tensor
    reported: torch.Tensor
    gain: torch.Tensor


def score_gain(before: GuardScores, after: GuardScores, reward_weight: float = 1.0) -> torch.Tensor:
    """``gain = (d p + d a) / 2 + reward_weight * d r / max(|r_before|, 1e-6)`` (module docstring): (B,) float64."""
    gain = ((after.perceptual.double() - before.perceptual.double())
            + (after.alignment.double() - before.alignment.double())) / 2
    if (before.reward is None) != (after.reward is None):
        raise ValueError("Score both the input and the refined pictures with the reward, or neither.")
    if before.reward is not None:
        scale = before.reward.double().abs().clamp(min=RELATIVE_FLOOR)
        gain = gain + reward_weight * (after.reward.double() - before.reward.double()) / scale
    return gain


def passes_guard(before: GuardScores, after: GuardScores, settings: GuardSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each refined picture is better (module docstring's rule): (keep (B,) bool, gain (B,) float64)."""
    gain = score_gain(before, after, settings.reward_weight)
    no_big_drop = ((after.perceptual.double() - before.perceptual.double() >= -settings.tolerance)
                   & (after.alignment.double() - before.alignment.double() >= -settings.tolerance))
    return (gain >= settings.margin) & no_big_drop & torch.isfinite(gain), gain


def choose_attempts(before: GuardScores, attempts: list[GuardScores], settings: GuardSettings) -> GuardDecision:
    """The best passing attempt per picture. attempts: one GuardScores per attempt (each (B,)); returns the decision
    with, where no attempt passes, keep False, attempt -1 and the best (highest) gain of all attempts."""
    if not attempts:
        raise ValueError("choose_attempts needs at least one attempt (attempts >= 1).")
    results = [passes_guard(before, after, settings) for after in attempts]
    passed = torch.stack([keep for keep, _ in results])  # (attempts, B)
    gains = torch.stack([gain for _, gain in results])  # (attempts, B)
    ranked = torch.where(passed, gains, torch.full_like(gains, -math.inf))
    keep = passed.any(dim=0)
    reported = torch.where(keep, ranked.argmax(dim=0), gains.argmax(dim=0))  # first of equals
    attempt = torch.where(keep, reported, torch.full_like(reported, -1))
    gain = gains[reported, torch.arange(gains.shape[1])]
    return GuardDecision(keep=keep, attempt=attempt, reported=reported, gain=gain)



def kept_pictures(inputs: torch.Tensor, attempts: list[torch.Tensor], decision: GuardDecision) -> torch.Tensor:
    """Per picture the attempt the decision keeps, else the input bit-identical: inputs and every attempt (B, ...)
    of one shape; returns a new (B, ...) tensor."""
    chosen = inputs.clone()
    for index in range(inputs.shape[0]):
        if decision.keep[index]:
            chosen[index] = attempts[int(decision.attempt[index])][index]
    return chosen

def guard_table(before: GuardScores, after: list[GuardScores], decision: GuardDecision) -> str:
    """Markdown table, one row per picture: p and a before / after (of the attempt kept, or the best gain when
    none passed), reward when scored, gain, and the decision."""
    has_reward = before.reward is not None
    header = "| image | p before | p after | a before | a after |" + (" reward before | reward after |" if has_reward
                                                                      else "") + " gain | decision |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for index in range(before.perceptual.shape[0]):
        chosen = int(decision.attempt[index])
        shown = after[int(decision.reported[index])]
        cells = [str(index), f"{float(before.perceptual[index]):.3f}", f"{float(shown.perceptual[index]):.3f}",
                 f"{float(before.alignment[index]):.3f}", f"{float(shown.alignment[index]):.3f}"]
        if has_reward:
            cells += [f"{float(before.reward[index]):.4g}", f"{float(shown.reward[index]):.4g}"]
        verdict = f"refined (attempt {chosen + 1})" if chosen >= 0 else "input kept (not better)"
        cells += [f"{float(decision.gain[index]):+.4f}", verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)



def attempt_seed(seed: int, attempt: int, seed_max: int = 0xFFFFFFFFFFFFFFFF) -> int:
    """The sampler seed of attempt ``attempt`` (0-based) of a refinement seeded ``seed``: ``seed`` itself for the
    first attempt (so one attempt samples exactly as without the guard), then 64 bits from
    ``numpy.random.SeedSequence([seed, attempt])`` folded into [0, seed_max]. seed, attempt >= 0."""
    if seed < 0 or attempt < 0:
        raise ValueError(f"seed and attempt must be >= 0, got seed {seed}, attempt {attempt}.")
    if attempt == 0:
        return int(seed)
    import numpy as np

    drawn = int(np.random.SeedSequence([int(seed), int(attempt)]).generate_state(1, dtype=np.uint64)[0])
    return drawn % (int(seed_max) + 1)
