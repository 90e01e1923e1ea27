"""The keep-better guard in graphs: G-Refine's built-in guard and the modular Keep Better node (thin adapters over
``core.keep_better``; the scores come from the quality-map and reward nodes' own functions)."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.keep_better import (
    GuardDecision,
    GuardScores,
    GuardSettings,
    choose_attempts,
    guard_table,
    kept_pictures,
)
from .comfy_io import check_images, match_batches
from .quality_maps import QualityClip, QualityPrompts, compute_quality_maps
from .scoring import Reward, score_batch

CATEGORY = "Refinery/refine"
DEFAULT_GUARD = GuardSettings()
MAX_ATTEMPTS = 16


def guard_knobs(with_switch: bool) -> list:
    """The guard's widgets (optional, so graphs saved before the guard existed still validate) and reward socket."""
    switch = [io.Boolean.Input("keep_better", default=True, optional=True,
                               tooltip="On: each refined picture is scored again (p, a, and the reward when one is "
                               "connected) and returned only if it scores better; otherwise the input comes back "
                               "bit-identical.")] if with_switch else []
    attempts = [io.Int.Input("attempts", default=1, min=1, max=MAX_ATTEMPTS, optional=True,
                             tooltip="With keep_better: refine this many times with derived seeds (the first uses "
                             "seed) and keep the best attempt that scores better. Each attempt costs a full "
                             "refinement.")] if with_switch else []
    return switch + attempts + [
        io.Float.Input("margin", default=DEFAULT_GUARD.margin, min=0.0, max=1.0, step=0.001, optional=True,
                       tooltip="The least gain that counts as better; gain = the mean change of p and a plus "
                       "reward_weight times the reward's relative change."),
        io.Float.Input("tolerance", default=DEFAULT_GUARD.tolerance, min=0.0, max=1.0, step=0.001, optional=True,
                       tooltip="How far p or a alone may drop in a picture that is kept."),
        io.Float.Input("reward_weight", default=DEFAULT_GUARD.reward_weight, min=0.0, max=100.0, step=0.1,
                       optional=True, tooltip="Weight of the reward's relative change in the gain (a connected "
                       "reward only)."),
        Reward.Input("reward", optional=True,
                     tooltip="A reward model (Load Reward Model) that also has to agree: its relative change joins "
                     "the gain."),
    ]


def guard_scores(quality_clip, images: torch.Tensor, prompt: str, quality_prompts=None, reward=None,
                 emphasis: float = 1.1) -> GuardScores:
    """p and a of pictures (B, H, W, 3) in [0, 1] against the plain prompt (one quality-model forward), and the
    reward's score when one is given."""
    maps = compute_quality_maps(quality_clip, images, quality_prompts=quality_prompts, prompt=prompt,
                                emphasis=emphasis, progress=False)
    rewarded = score_batch(reward, images, [prompt] * images.shape[0], progress=False) if reward is not None else None
    return GuardScores(maps.perceptual_score, maps.alignment_score, rewarded)


def guarded(images: torch.Tensor, attempts: list[torch.Tensor], before: GuardScores, score,
            settings: GuardSettings) -> tuple[torch.Tensor, GuardDecision, str]:
    """Each picture's best attempt that scores better, else its input bit-identical: (pictures, decision, table).
    images and every attempt: (B, H, W, 3); score: pictures -> GuardScores."""
    after = [score(attempt) for attempt in attempts]
    decision = choose_attempts(before, after, settings)
    return kept_pictures(images, attempts, decision), decision, guard_table(before, after, decision)


class KeepBetter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefineryKeepBetter",
            display_name="Keep Better (Refinery)",
            category=CATEGORY,
            description="The keep-better guard for hand-built graphs: scores the original and the refined pictures "
            "with the quality maps (p, a) and an optional reward, and returns per picture the refined one only if "
            "it scores better (gain >= margin, neither p nor a dropping more than tolerance), else the original "
            "bit-identical.",
            inputs=[
                io.Image.Input("original", tooltip="The pictures before refinement."),
                io.Image.Input("refined", tooltip="The same pictures refined (same batch size and picture size)."),
                QualityClip.Input("quality_clip", tooltip="From Load Quality CLIP."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The generation prompt (the AQ-Map scores a against it; empty = p alone)."),
                QualityPrompts.Input("quality_prompts", optional=True,
                                     tooltip="Learned quality prompts; unconnected = the plain-text pairs."),
                *guard_knobs(with_switch=False),
            ],
            outputs=[
                io.Image.Output("image", tooltip="Per picture the refined one if it scored better, else the original."),
                io.Boolean.Output("kept", tooltip="Per picture: True = the refined picture was returned.",
                                  is_output_list=True),
                io.Float.Output("gain", tooltip="Per picture: the gain of the refined picture.", is_output_list=True),
                io.String.Output("table", tooltip="Scores before and after, gain and decision per picture."),
            ],
        )

    @classmethod
    def execute(cls, original, refined, quality_clip, prompt: str, quality_prompts=None,
                margin: float = DEFAULT_GUARD.margin, tolerance: float = DEFAULT_GUARD.tolerance,
                reward_weight: float = DEFAULT_GUARD.reward_weight, reward=None) -> io.NodeOutput:
        settings = GuardSettings(margin=margin, tolerance=tolerance, reward_weight=reward_weight)
        original, refined = check_images(original, "original"), check_images(refined, "refined")
        if original.shape != refined.shape:
            original, refined = match_batches(original, refined, ("original", "refined"))
            if original.shape[1:] != refined.shape[1:]:
                raise ValueError(f"'original' pictures are {tuple(original.shape[1:3])} but 'refined' ones are "
                                 f"{tuple(refined.shape[1:3])}: connect the refined pictures of the same originals.")

        def score(pictures):
            return guard_scores(quality_clip, pictures, prompt, quality_prompts, reward)

        chosen, decision, table = guarded(original, [refined], score(original), score, settings)
        return io.NodeOutput(chosen, decision.keep.tolist(), decision.gain.tolist(), table, ui={"text": [table]})


NODES = [KeepBetter]
