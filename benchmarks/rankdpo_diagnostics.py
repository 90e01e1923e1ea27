"""Why the shipped RankDPO / DPO LoRAs lose under the held-out attribute judge (issue 7's analysis): figures for
``rankdpo_toyworld.py``'s reading, from the LoRAs in ``benchmarks/toyworld/models/loras`` (seed 0, 300 steps).

- Rendered scenes (ground truth): each toy reward's mean on the captioned picture, the same background with the
  object removed, and the object in another colour. It shows what the training rewards prefer over what.
- Held-out captions, base against each LoRA, from the same noise: how many captions the judge loses and gains, and
  the judge's win rate split by object size (large / small).
- The same win rate under a judge that reads the background tone from the picture's 2-pixel border instead of the
  caption. This tests whether the drop is an artefact of the caption's tone.
- Random-direction control: for each LoRA, --random-directions LoRAs whose every module's update ``B A`` is a random
  rank-r matrix (:func:`random_direction_lora`), first of the trained update's Frobenius norm, then rescaled so that
  the pictures change as much as the trained LoRA changes them (mean |tuned - base| pixel change; the change is
  close to linear in the scale). Their judge win rate shows what a change of that size costs the judge when it
  carries no preference at all.

Run: python benchmarks/rankdpo_diagnostics.py [--threads 2] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also the toy-world preference evaluation of rankdpo_toyworld.py)

from comfyui_refinery.benchmarks.toyworld import rewards, scenes  # noqa: E402
from comfyui_refinery.benchmarks.toyworld.train_tiny_sd import classify_object  # noqa: E402

RENDER_SEED = 5
BORDER = 2


def rendered_variants(count: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """``count`` single-object plain-background scenes: captions and pictures (count, 64, 64, 3) in [0, 1] as
    captioned ("right"), without the object ("empty") and with the object in another palette colour ("recoloured")."""
    rng = np.random.default_rng(RENDER_SEED)
    captions, pictures = [], {"right": [], "empty": [], "recoloured": []}
    while len(captions) < count:
        scene = scenes.sample_scene(rng, 64, max_groups=1)
        if scene.background != "plain" or scene.objects[0].count != 1:
            continue
        others = [colour for colour in scenes.COLOURS if colour != scene.objects[0].colour]
        captions.append(scenes.caption(scene))
        pictures["right"].append(scenes.render(scene))
        pictures["empty"].append(scenes.render(scene, skip={(0, 0)}))
        pictures["recoloured"].append(scenes.render(scene, colours={0: others[int(rng.integers(len(others)))]}))
    return captions, {name: torch.tensor(np.stack(values)).float() / 255 for name, values in pictures.items()}


def border_tone_judge(pictures: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """The attribute judge with the background tone taken as the median of the picture's border pixels.
    pictures: (N, H, W, 3) in [0, 1]. Returns (N,) in {0, 0.5, 1}."""
    scores = []
    for picture, caption in zip((pictures.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), captions):
        colour, shape, _ = rewards.parse_single_object_caption(caption)
        frame = np.concatenate([picture[:BORDER].reshape(-1, 3), picture[-BORDER:].reshape(-1, 3),
                                picture[:, :BORDER].reshape(-1, 3), picture[:, -BORDER:].reshape(-1, 3)])
        tone = tuple(int(value) for value in np.median(frame, axis=0))
        found_colour, found_shape = classify_object(np.ascontiguousarray(picture), tone)
        scores.append(0.5 * (found_colour == colour) + 0.5 * (found_shape == shape))
    return torch.tensor(scores, dtype=torch.float32)


def random_direction_lora(lora: Path, output: Path, seed: int, scale: float = 1.0) -> Path:
    """Write to ``output`` a LoRA with ``lora``'s keys, ranks and alphas whose every module's update ``up @ down``
    (out, in) is replaced by a random rank-r matrix (Gaussian factors, seeded) of ``scale`` times the trained
    update's Frobenius norm: a change in a direction that carries no preference."""
    weights = load_file(str(lora))
    generator = torch.Generator().manual_seed(seed)
    for key in [key for key in weights if key.endswith(".lora_up.weight")]:
        down_key = key.replace(".lora_up.", ".lora_down.")
        up, down = weights[key].float(), weights[down_key].float()  # (out, r), (r, in)
        random_up = torch.randn(up.shape, generator=generator)
        random_down = torch.randn(down.shape, generator=generator)
        norm_ratio = torch.linalg.matrix_norm(up @ down) / torch.linalg.matrix_norm(random_up @ random_down)
        weights[key] = (random_up * norm_ratio * scale).to(weights[key].dtype).contiguous()
        weights[down_key] = random_down.to(weights[down_key].dtype).contiguous()
    save_file(weights, str(output))
    return output


def random_direction_pictures(pipeline, lora: Path, folder: Path, seed: int, scale: float,
                              captions: list[str]) -> torch.Tensor:
    """The held-out pictures (the benchmark's evaluation noise) of the base with :func:`random_direction_lora` of
    ``lora`` (written in ``folder``) loaded: (N, 64, 64, 3) in [0, 1]."""
    path = random_direction_lora(lora, folder / f"{lora.stem}-random{seed}-x{scale:.4g}.safetensors", seed, scale)
    pipeline.load_lora_weights(str(path), adapter_name=path.stem.replace(".", "_"))
    pictures = common.generate(pipeline, captions, common.EVAL_NOISE_SEED, 20, 4.0)
    pipeline.unload_lora_weights()
    return pictures


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eval-prompts", type=int, default=96)
    parser.add_argument("--random-directions", type=int, default=4, help="random-direction LoRAs per trained LoRA")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    threads = common.limit_threads(args.threads)
    reward_table = common.all_rewards()
    reward_models = list(reward_table.values())
    numbers: dict[str, float] = {}

    captions, variants = rendered_variants(64)
    for variant, pictures in variants.items():
        for name, values in common.score_all(reward_models, pictures, captions).items():
            numbers[f"rendered_{variant}_mean_{name}"] = float(values.mean())

    eval_captions = rewards.single_object_captions(args.eval_prompts, common.HELD_OUT_CAPTION_SEED)
    large = torch.tensor([" large " in caption for caption in eval_captions])
    judge = reward_table[common.JUDGE]
    pipeline = common.load_pipeline()
    base = common.generate(pipeline, eval_captions, common.EVAL_NOISE_SEED, 20, 4.0)
    base_judge, base_border = judge.score(base, eval_captions), border_tone_judge(base, eval_captions)
    numbers["base_mean_border_judge"] = float(base_border.mean())
    for loss in common.LOSSES:
        pipeline.load_lora_weights(str(common.SHIPPED_LORAS / f"{loss}.safetensors"), adapter_name=loss)
        tuned = common.generate(pipeline, eval_captions, common.EVAL_NOISE_SEED, 20, 4.0)
        pipeline.unload_lora_weights()
        tuned_judge, tuned_border = judge.score(tuned, eval_captions), border_tone_judge(tuned, eval_captions)
        numbers[f"{loss}_judge_lost"] = float((tuned_judge < base_judge).sum())
        numbers[f"{loss}_judge_gained"] = float((tuned_judge > base_judge).sum())
        numbers[f"{loss}_judge_win_large"] = common.win_rate(tuned_judge[large], base_judge[large])
        numbers[f"{loss}_judge_win_small"] = common.win_rate(tuned_judge[~large], base_judge[~large])
        numbers[f"{loss}_border_judge_win"] = common.win_rate(tuned_border, base_border)
        numbers[f"{loss}_mean_border_judge"] = float(tuned_border.mean())
        numbers[f"{loss}_change"] = float((tuned - base).abs().mean())
        wins, changes, norm_matched_changes = [], [], []
        with tempfile.TemporaryDirectory() as scratch:
            lora = common.SHIPPED_LORAS / f"{loss}.safetensors"
            for seed in range(args.random_directions):
                moved = random_direction_pictures(pipeline, lora, Path(scratch), seed, 1.0, eval_captions)
                norm_matched_changes.append(float((moved - base).abs().mean()))
                scale = numbers[f"{loss}_change"] / max(norm_matched_changes[-1], 1e-6)
                moved = random_direction_pictures(pipeline, lora, Path(scratch), seed, scale, eval_captions)
                wins.append(common.win_rate(judge.score(moved, eval_captions), base_judge))
                changes.append(float((moved - base).abs().mean()))
        if wins:
            numbers[f"{loss}_random_direction_norm_matched_change"] = float(np.mean(norm_matched_changes))
            numbers[f"{loss}_random_direction_judge_win"] = float(np.mean(wins))
            numbers[f"{loss}_random_direction_judge_win_min"] = float(np.min(wins))
            numbers[f"{loss}_random_direction_judge_win_max"] = float(np.max(wins))
            numbers[f"{loss}_random_direction_change"] = float(np.mean(changes))

    rendered = "; ".join(f"{name} " + " / ".join(f"{numbers[f'rendered_{variant}_mean_{name}']:.3f}"
                                                for variant in variants) for name in reward_table)
    per_loss = "; ".join(
        f"{loss}: judge lost {numbers[f'{loss}_judge_lost']:.0f} / gained {numbers[f'{loss}_judge_gained']:.0f} of "
        f"{len(eval_captions)}, win large {numbers[f'{loss}_judge_win_large']:.3f} / small "
        f"{numbers[f'{loss}_judge_win_small']:.3f}, border-tone judge win {numbers[f'{loss}_border_judge_win']:.3f}, "
        f"change {numbers[f'{loss}_change']:.3f}"
        + (f"; {args.random_directions} random-direction LoRAs (the same norms change the pictures by only "
           f"{numbers[f'{loss}_random_direction_norm_matched_change']:.3f}), rescaled to the same change: judge win "
           f"{numbers[f'{loss}_random_direction_judge_win']:.3f} ({numbers[f'{loss}_random_direction_judge_win_min']:.3f}"
           f"-{numbers[f'{loss}_random_direction_judge_win_max']:.3f}), change "
           f"{numbers[f'{loss}_random_direction_change']:.3f}" if args.random_directions else "")
        for loss in common.LOSSES)
    summary = (f"rendered scenes, right / empty / recoloured: {rendered}. Shipped LoRAs against the base on "
               f"{len(eval_captions)} held-out captions ({int(large.sum())} large objects): {per_loss}; "
               f"{threads} threads")
    return common.report("rankdpo_diagnostics", numbers, summary, argv, write=not args.no_write)


if __name__ == "__main__":
    main()
