"""RankDPO vs pairwise Diffusion-DPO vs the base model on the toy world (issue target: RankDPO > DPO > base, with the
spread over at least 3 seeds).

Data (Syn-Pic, rankdpo.txt sec. 3.2, built by ``refinery-synpic``'s code): --prompts single-object captions on plain
backgrounds ("a small red circle on a plain grey background"); k = 4 generators = 4 seeds of the shipped tiny-sd
(20 DDIM steps, guidance 4), or with ``--generator-set mixed`` 4 sampler settings of different quality
(MIXED_GENERATORS, the toy counterpart of the paper's four models); n = 2 rewards (``--training-rewards``,
``benchmarks/toyworld/rewards.py``), by default two alignment rewards: toy-clip CLIPScore and the G-Refine alignment
score a (AQ-Map); win rates phi.
``--training-rewards toy-clip toy-quality-p`` is the first design (CLIPScore + the PQ score p): on its data p orders
pairs of pictures against the attribute judge (42 % agreement on pairs the judge separates, phi 52 %), so the
preference carries no signal the judge can see; the two alignment rewards agree with the judge on 65 %.
``--labels random`` is the paper's "Random Labelling" control (Tab. 4): each group's win rates are shuffled (seeded),
so the runs see the same pictures and the same label values without the rewards' information.

Training (``refinery-train-rankdpo``'s code, in-process): from the same data, the same LoRA (rank 8, attention
projections), steps, batch, learning rate, beta and seed, ``--loss rankdpo`` (DCG-weighted, all 4 images) and
``--loss dpo`` (best vs worst image of each prompt); --seeds training seeds each, for every training budget of
--steps (one run per budget: the cosine schedule spans the run, so a budget is not a prefix of a longer run).

Evaluation captions are drawn with another seed than the training ones, but from the same small caption space (96
captions: size x colour x shape x background tone), so by default (``--eval-captions overlapping``) 48 of the 54
distinct evaluation captions are also training captions: the pictures are new (fresh noise), the captions mostly not.
``--eval-captions unseen`` drops every evaluation caption from the training prompts (drawn on from the training seed
until --train-prompts are found), so the evaluation is on captions the training never saw. Each model generates one
picture per evaluation caption from the same initial noise as the base model; win rate against the base = fraction
of captions where the fine-tuned picture scores higher (ties count half), under each of the four toy rewards: the
training ones, and the held-out ones, always including the attribute judge (a GenEval-like check of the object's
colour and shape, never used in training); plus each reward's mean and
the mean pixel change against the base pictures (how far the LoRA moved them). For scale, ``best_of_k_*``: with no
training, the best of k fresh base pictures per evaluation caption by the training rewards' Syn-Pic win rates, against
the same base pictures (what a perfect distillation of the preference could give). ``target_met_s<steps>`` is 1 when,
at that budget, RankDPO's mean win rate beats DPO's and DPO's beats 0.5 under every reward.

Run: python benchmarks/rankdpo_toyworld.py [--steps 100 200 300] [--seeds 0 1 2] [--threads 2] [--ship-loras]
[--no-write] [--training-rewards toy-clip toy-alignment-a] [--labels rewards|random] [--generator-set seeds|mixed]
[--eval-captions overlapping|unseen]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    EVAL_NOISE_SEED,
    HELD_OUT_CAPTION_SEED,
    JUDGE,
    LOSSES,
    SHIPPED_LORAS,
    all_rewards,
    generate,
    limit_threads,
    load_pipeline,
    report,
    score_all,
    win_rate,
)

from comfyui_refinery.benchmarks.toyworld import data, rewards  # noqa: E402
from comfyui_refinery.core.rankdpo import DISCOUNT_RANKS  # noqa: E402
from comfyui_refinery.core.reward_aggregation import syn_pic_win_rates  # noqa: E402
from comfyui_refinery.trainers.common.atomic import atomic_write_text  # noqa: E402
from comfyui_refinery.trainers.rankdpo import train as rankdpo_trainer  # noqa: E402

TRAIN_CAPTION_SEED = 101
SELECTION_NOISE_SEED = 5000
TRAINING_REWARD_CHOICES = ("toy-clip", "toy-alignment-a", "toy-quality-p")
# --generator-set mixed: k = 4 sampler settings of tiny-sd, (sampling steps, guidance), of increasing quality (judge
# mean on the 96 evaluation captions: 0.214, 0.245, 0.271, 0.30), the toy counterpart of the paper's four generators of
# different strength; the third is the base model's own setting (--sampling-steps 20, --guidance 4).
MIXED_GENERATORS = ((5, 4.0), (20, 1.0), (20, 4.0), (40, 7.0))


def generator_settings(args: argparse.Namespace) -> list[tuple[int, float]]:
    """The k generators as (sampling steps, guidance): --generators copies of the base setting (k seeds of one
    model), or MIXED_GENERATORS (--generator-set mixed)."""
    if args.generator_set == "mixed":
        return list(MIXED_GENERATORS)
    return [(args.sampling_steps, args.guidance)] * args.generators


def build_synpic(folder: Path, captions: list[str], generators: list[tuple[int, float]], threads: int,
                 training_rewards: list) -> Path:
    """The Syn-Pic dataset of ``captions`` (``refinery-synpic``'s code): one generator of tiny-sd per (sampling
    steps, guidance) of ``generators``, each with its own seed, ranked by ``training_rewards``. Returns the dataset
    folder."""
    from comfyui_refinery.trainers.synpic.config import GeneratorSpec, SynPicConfig
    from comfyui_refinery.trainers.synpic.run import build_dataset

    prompts = folder / "prompts.txt"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("\n".join(captions) + "\n")
    config = SynPicConfig(
        prompts=prompts, output_dir=folder / "synpic", rewards=(),
        generators=tuple(GeneratorSpec(name=f"seed-{index}-steps{steps}-cfg{guidance:g}", model=data.TOY_SD_FOLDER,
                                       seed=index, steps=steps, guidance_scale=guidance)
                         for index, (steps, guidance) in enumerate(generators)),
        batch_size=32, seed=0, threads=threads, device="cpu")
    build_dataset(config, training_rewards)
    return config.output_dir


def learning_rate(loss: str, args: argparse.Namespace) -> float:
    """--learning-rate, or --rankdpo-learning-rate for RankDPO when given (the drift-matched variant)."""
    return args.rankdpo_learning_rate if loss == "rankdpo" and args.rankdpo_learning_rate else args.learning_rate


@torch.no_grad()
def best_of_k_scores(pipeline, reward_models: list, training_rewards: list[str], captions: list[str],
                     args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """What the preference data points at, without training: per caption, one fresh picture of each of the k
    generators (``generator_settings``; picture j of caption i from noise seed ``SELECTION_NOISE_SEED + j N + i``),
    and the one with the highest Syn-Pic win rate under the training rewards (first of equals). Returns its scores
    under every reward: name -> (N,)."""
    candidates = [score_all(reward_models, generate(pipeline, captions, SELECTION_NOISE_SEED + len(captions) * index,
                                                    steps, guidance), captions)
                  for index, (steps, guidance) in enumerate(generator_settings(args))]
    stacked = {name: torch.stack([scores[name] for scores in candidates], dim=-1) for name in candidates[0]}  # (N, k)
    win_rates = syn_pic_win_rates(torch.stack([stacked[name] for name in training_rewards], dim=1))  # (N, k)
    best = win_rates.argmax(dim=-1, keepdim=True)
    return {name: values.gather(-1, best).squeeze(-1) for name, values in stacked.items()}


def shuffled_labels(dataset: Path, seed: int = 0) -> Path:
    """The "Random Labelling" control (rankdpo.txt Tab. 4): ``index-random-labels.jsonl`` beside ``dataset``'s index,
    the same groups with each group's win rates permuted (seeded, numpy). Returns the new index file."""
    rng = np.random.default_rng(seed)
    lines = []
    for line in (dataset / "index.jsonl").read_text().splitlines():
        if line.strip():
            group = json.loads(line)
            group["win_rates"] = [group["win_rates"][index] for index in rng.permutation(len(group["win_rates"]))]
            group.pop("scores", None)  # the scores no longer explain the labels
            lines.append(json.dumps(group))
    return atomic_write_text(dataset / "index-random-labels.jsonl", "\n".join(lines) + "\n")


def train_one(dataset: Path, output: Path, loss: str, seed: int, steps: int, args: argparse.Namespace) -> Path:
    config = rankdpo_trainer.parse_args([
        "--dataset", str(dataset), "--model", str(data.TOY_SD_FOLDER), "--output-dir", str(output),
        "--loss", loss, "--seed", str(seed), "--max-train-steps", str(steps),
        "--train-batch-size", str(args.batch_size), "--learning-rate", str(learning_rate(loss, args)),
        "--beta", str(args.beta), "--dcg-ranks", args.dcg_ranks, "--rank", "8", "--checkpointing-steps", str(steps + 1),
        "--log-every", str(max(1, steps // 5)), "--threads", str(args.threads)])
    return rankdpo_trainer.train(config)


def training_captions(count: int, excluded: set[str]) -> list[str]:
    """``count`` training captions from TRAIN_CAPTION_SEED's draw, skipping those in ``excluded`` (the evaluation
    captions for ``--eval-captions unseen``); ValueError when the caption space left is too small to draw from."""
    try:
        return rewards.single_object_captions(count, TRAIN_CAPTION_SEED, excluded=excluded)
    except ValueError as error:
        raise ValueError(f"Cannot draw {count} training captions outside the {len(excluded)} evaluation captions: "
                         "use fewer --eval-prompts or --eval-captions overlapping.") from error


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-prompts", type=int, default=192)
    parser.add_argument("--eval-prompts", type=int, default=96)
    parser.add_argument("--generators", type=int, default=4, help="k seeds of tiny-sd per prompt")
    parser.add_argument("--generator-set", choices=("seeds", "mixed"), default="seeds",
                        help="seeds: --generators seeds of the base sampler setting; mixed: the 4 sampler settings "
                        "of MIXED_GENERATORS, of different quality (like the paper's 4 models)")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200, 300],
                        help="training budgets: every seed trains each loss once per budget")
    parser.add_argument("--batch-size", type=int, default=8, help="prompt groups per step")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rankdpo-learning-rate", type=float, default=None, help="RankDPO's own learning rate "
                        "(default: --learning-rate), to compare the two at a matched amount of change")
    parser.add_argument("--beta", type=float, default=2500.0)
    parser.add_argument("--dcg-ranks", choices=DISCOUNT_RANKS, default="model",
                        help="RankDPO's DCG discount ranks by the current model (default) or by the labels")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--training-rewards", nargs="+", choices=TRAINING_REWARD_CHOICES,
                        default=["toy-clip", "toy-alignment-a"], help="the Syn-Pic rewards (the attribute judge is "
                        "never one of them)")
    parser.add_argument("--labels", choices=("rewards", "random"), default="rewards",
                        help="random: each group's win rates shuffled (the paper's Random Labelling control)")
    parser.add_argument("--eval-captions", choices=("overlapping", "unseen"), default="overlapping",
                        help="unseen: no evaluation caption among the training prompts (default: both drawn from the "
                        "same 96-caption space, so most evaluation captions also occur in training)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the data and LoRAs here (default: a "
                        "temporary folder)")
    parser.add_argument("--ship-loras", action="store_true", help="copy the first seed's LoRAs of the largest "
                        "budget to benchmarks/toyworld/models/loras/<loss>.safetensors (what the demo shows)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if min(args.steps) < 1:
        parser.error(f"--steps must be positive, got {args.steps}.")
    args.steps = sorted(set(args.steps))
    if args.generator_set == "mixed":
        args.generators = len(MIXED_GENERATORS)
    return args


def target_met(numbers: dict[str, float], budget: int, reward_names) -> bool:
    """RankDPO > DPO > base (win rate 0.5) under every reward, on the means over the seeds, at ``budget``."""
    return all(numbers[f"rankdpo_s{budget}_win_{name}"] > numbers[f"dpo_s{budget}_win_{name}"] > 0.5
               for name in reward_names)


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    args.threads = limit_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        eval_captions = rewards.single_object_captions(args.eval_prompts, HELD_OUT_CAPTION_SEED)
        distinct_eval_captions = set(eval_captions)
        train_captions = training_captions(args.train_prompts, distinct_eval_captions
                                           if args.eval_captions == "unseen" else set())
        reward_table = all_rewards()
        dataset = build_synpic(work / "data", train_captions, generator_settings(args), args.threads,
                               [reward_table[name] for name in args.training_rewards])
        if args.labels == "random":
            dataset = shuffled_labels(dataset)
        data_seconds = time.perf_counter() - started
        reward_models = list(reward_table.values())
        pipeline = load_pipeline()
        base_pictures = generate(pipeline, eval_captions, EVAL_NOISE_SEED, args.sampling_steps, args.guidance)
        base_scores = score_all(reward_models, base_pictures, eval_captions)
        selected_scores = best_of_k_scores(pipeline, reward_models, args.training_rewards, eval_captions, args)
        results: dict[str, dict[str, list[float]]] = {}  # "<loss>_s<budget>" -> metric -> one value per seed
        for seed in args.seeds:
            for budget in args.steps:
                for loss in LOSSES:
                    lora = train_one(dataset, work / f"{loss}-steps{budget}-seed{seed}", loss, seed, budget, args)
                    if args.ship_loras and seed == args.seeds[0] and budget == args.steps[-1]:
                        SHIPPED_LORAS.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(lora, SHIPPED_LORAS / f".{loss}.safetensors.tmp")
                        os.replace(SHIPPED_LORAS / f".{loss}.safetensors.tmp", SHIPPED_LORAS / f"{loss}.safetensors")
                    pipeline.load_lora_weights(str(lora), adapter_name=f"{loss}{budget}x{seed}")
                    pictures = generate(pipeline, eval_captions, EVAL_NOISE_SEED, args.sampling_steps, args.guidance)
                    pipeline.unload_lora_weights()
                    scores = score_all(reward_models, pictures, eval_captions)
                    table = results.setdefault(f"{loss}_s{budget}", {})
                    for name, values in scores.items():
                        table.setdefault(f"win_{name}", []).append(win_rate(values, base_scores[name]))
                        table.setdefault(f"mean_{name}", []).append(float(values.mean()))
                    # how far the LoRA moved the pictures: mean |fine-tuned - base| over pixels and channels, in [0, 1]
                    table.setdefault("change", []).append(float((pictures - base_pictures).abs().mean()))
                    print(loss, budget, seed, {key: round(value[-1], 3) for key, value in table.items()}, flush=True)
    numbers: dict[str, float] = {}
    for name, values in base_scores.items():
        numbers[f"base_mean_{name}"] = float(values.mean())
    for run, table in results.items():
        for key, values in table.items():
            numbers[f"{run}_{key}"] = statistics.mean(values)
            numbers[f"{run}_{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            numbers[f"{run}_{key}_min"] = min(values)
    for name, values in selected_scores.items():
        numbers[f"best_of_k_win_{name}"] = win_rate(values, base_scores[name])
        numbers[f"best_of_k_mean_{name}"] = float(values.mean())
    judge, last = JUDGE, args.steps[-1]
    for budget in args.steps:
        numbers[f"target_met_s{budget}"] = float(target_met(numbers, budget, base_scores))
    numbers["ratio"] = numbers[f"rankdpo_s{last}_win_{judge}"] / max(numbers[f"dpo_s{last}_win_{judge}"], 1e-9)
    numbers["eval_captions_distinct"] = float(len(distinct_eval_captions))
    numbers["eval_captions_seen_in_training"] = float(len(distinct_eval_captions & set(train_captions)))
    numbers.update(seeds=float(len(args.seeds)), steps=float(last), train_prompts=float(args.train_prompts),
                   eval_prompts=float(args.eval_prompts), generators=float(args.generators),
                   data_seconds=data_seconds, seconds=time.perf_counter() - started, threads=float(args.threads))
    lines = []
    for budget in args.steps:
        parts = []
        for loss in LOSSES:
            run = f"{loss}_s{budget}"
            wins = ", ".join(f"{name} {numbers[f'{run}_win_{name}']:.3f}+-{numbers[f'{run}_win_{name}_std']:.3f}"
                             for name in base_scores)
            parts.append(f"{loss} (lr {learning_rate(loss, args):g}) {wins}, judge mean "
                         f"{numbers[f'{run}_mean_{judge}']:.3f}, change {numbers[f'{run}_change']:.3f}")
        verdict = "met" if numbers[f"target_met_s{budget}"] else "not met"
        lines.append(f"{budget} steps: " + "; ".join(parts) + f"; target {verdict}")
    held_out = [name for name in base_scores if name not in args.training_rewards]
    selection = ", ".join(f"{name} {numbers[f'best_of_k_win_{name}']:.3f}" for name in base_scores)
    summary = ("win rate vs base by training budget. " + ". ".join(lines)
               + f". No training, best of {args.generators} base pictures by the training rewards' win rates: "
               f"{selection}, judge mean {numbers[f'best_of_k_mean_{judge}']:.3f}"
               + f". Base judge mean {numbers[f'base_mean_{judge}']:.3f}; ratio (RankDPO / DPO win rate under the "
               f"held-out judge at {last} steps) {numbers['ratio']:.3f}; {len(args.seeds)} seeds x "
               f"{args.batch_size} groups, k = {args.generators} ({args.generator_set}), trained on "
               f"{' + '.join(args.training_rewards)} "
               f"({args.labels} labels; held out: {', '.join(held_out)}), {args.train_prompts} train / "
               f"{args.eval_prompts} evaluation captions ({numbers['eval_captions_distinct']:.0f} distinct, "
               f"{numbers['eval_captions_seen_in_training']:.0f} of them among the training ones), beta "
               f"{args.beta:g}, DCG ranks by the {args.dcg_ranks}; "
               f"{args.threads} threads, {numbers['seconds']:.0f} s")
    return report("rankdpo_toyworld", numbers, summary, argv, write=not args.no_write)


if __name__ == "__main__":
    main()
