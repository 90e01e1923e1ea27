"""RankDPO vs pairwise Diffusion-DPO vs the base model on the toy world (issue target: RankDPO > DPO > base, with the
spread over at least 3 seeds).

Data (Syn-Pic, rankdpo.txt sec. 3.2, built by ``refinery-synpic``'s code): --prompts single-object captions on plain
backgrounds ("a small red circle on a plain grey background"); k = 4 generators = 4 seeds of the shipped tiny-sd
(20 DDIM steps, guidance 4); n = 2 rewards (``--training-rewards``, ``benchmarks/toyworld/rewards.py``), by
default two alignment rewards: toy-clip CLIPScore and the G-Refine alignment score a (AQ-Map); win rates phi.
``--training-rewards toy-clip toy-quality-p`` is the first design (CLIPScore + the PQ score p): on its data p orders
pairs of pictures against the attribute judge (42 % agreement on pairs the judge separates, phi 52 %), so the
preference carries no signal the judge can see; the two alignment rewards agree with the judge on 65 %.

Training (``refinery-train-rankdpo``'s code, in-process): from the same data, the same LoRA (rank 8, attention
projections), steps, batch, learning rate, beta and seed, ``--loss rankdpo`` (DCG-weighted, all 4 images) and
``--loss dpo`` (best vs worst image of each prompt); --seeds training seeds each.

Evaluation on held-out captions: each model generates one picture per caption from the same initial noise as the
base model; win rate against the base = fraction of captions where the fine-tuned picture scores higher (ties count
half), under each of the four toy rewards: the training ones, and the held-out ones, always including the attribute
judge (a GenEval-like check of the object's colour and shape, never used in training); plus each reward's mean.

Run: python benchmarks/rankdpo_toyworld.py [--steps 300] [--seeds 0 1 2] [--threads 2] [--ship-loras] [--no-write]
[--training-rewards toy-clip toy-alignment-a]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import limit_threads, write_results  # noqa: E402

from comfyui_refinery.benchmarks.toyworld import data, rewards  # noqa: E402
from comfyui_refinery.core.rankdpo import DISCOUNT_RANKS  # noqa: E402
from comfyui_refinery.trainers.rankdpo import train as rankdpo_trainer  # noqa: E402

TRAIN_CAPTION_SEED = 101
HELD_OUT_CAPTION_SEED = 202
EVAL_NOISE_SEED = 303
LOSSES = ("rankdpo", "dpo")
JUDGE = "attribute-judge"
TRAINING_REWARD_CHOICES = ("toy-clip", "toy-alignment-a", "toy-quality-p")
SHIPPED_LORAS = data.MODELS_DIR / "loras"


def load_pipeline():
    from comfyui_refinery.trainers.common.model_loading import load_sd_pipeline

    pipeline = load_sd_pipeline(data.TOY_SD_FOLDER)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def generate(pipeline, captions: list[str], seed: int, steps: int, guidance: float, batch_size: int = 32) -> torch.Tensor:
    """One picture per caption, caption i from the noise of generator seed ``seed + i``: (N, 64, 64, 3) in [0, 1]."""
    pictures = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + offset) for offset in range(len(chunk))]
        output = pipeline(chunk, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                          generator=generators, output_type="pt").images  # (b, 3, H, W) in [0, 1]
        pictures.append(output.permute(0, 2, 3, 1).float().clamp(0, 1))
    return torch.cat(pictures)


@torch.no_grad()
def score_all(reward_models: list, pictures: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
    return {reward.name: reward.score(pictures, captions).float().cpu() for reward in reward_models}


def win_rate(tuned: torch.Tensor, base: torch.Tensor) -> float:
    """Fraction of items where ``tuned`` beats ``base`` (ties half)."""
    return float(((tuned > base).float() + 0.5 * (tuned == base).float()).mean())


def all_rewards() -> dict:
    """The four toy rewards by name (``benchmarks/toyworld/rewards.py``)."""
    return {reward.name: reward for reward in (rewards.toy_clip_score(), rewards.ToyAlignmentReward(),
                                               rewards.ToyQualityReward(), rewards.AttributeJudge())}


def build_synpic(folder: Path, captions: list[str], generators: int, steps: int, guidance: float, threads: int,
                 training_rewards: list) -> Path:
    """The Syn-Pic dataset of ``captions`` (``refinery-synpic``'s code): ``generators`` seeds of tiny-sd, ranked by
    ``training_rewards``. Returns the dataset folder."""
    from comfyui_refinery.trainers.synpic.config import GeneratorSpec, SynPicConfig
    from comfyui_refinery.trainers.synpic.run import build_dataset

    prompts = folder / "prompts.txt"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("\n".join(captions) + "\n")
    config = SynPicConfig(
        prompts=prompts, output_dir=folder / "synpic", rewards=(), steps=steps, guidance_scale=guidance,
        generators=tuple(GeneratorSpec(name=f"seed-{index}", model=data.TOY_SD_FOLDER, seed=index)
                         for index in range(generators)),
        batch_size=32, seed=0, threads=threads, device="cpu")
    build_dataset(config, training_rewards)
    return config.output_dir


def learning_rate(loss: str, args: argparse.Namespace) -> float:
    """--learning-rate, or --rankdpo-learning-rate for RankDPO when given (the drift-matched variant)."""
    return args.rankdpo_learning_rate if loss == "rankdpo" and args.rankdpo_learning_rate else args.learning_rate


def train_one(dataset: Path, output: Path, loss: str, seed: int, args: argparse.Namespace) -> Path:
    config = rankdpo_trainer.parse_args([
        "--dataset", str(dataset), "--model", str(data.TOY_SD_FOLDER), "--output-dir", str(output),
        "--loss", loss, "--seed", str(seed), "--max-train-steps", str(args.steps),
        "--train-batch-size", str(args.batch_size), "--learning-rate", str(learning_rate(loss, args)),
        "--beta", str(args.beta), "--dcg-ranks", args.dcg_ranks, "--rank", "8", "--checkpointing-steps", str(args.steps + 1),
        "--log-every", str(max(1, args.steps // 5)), "--threads", str(args.threads)])
    return rankdpo_trainer.train(config)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-prompts", type=int, default=192)
    parser.add_argument("--eval-prompts", type=int, default=96)
    parser.add_argument("--generators", type=int, default=4, help="k seeds of tiny-sd per prompt")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
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
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the data and LoRAs here (default: a "
                        "temporary folder)")
    parser.add_argument("--ship-loras", action="store_true", help="copy the first seed's LoRAs to "
                        "benchmarks/toyworld/models/loras/<loss>.safetensors (what the demo shows)")
    parser.add_argument("--no-write", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    args.threads = args.threads or limit_threads()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        train_captions = rewards.single_object_captions(args.train_prompts, TRAIN_CAPTION_SEED)
        eval_captions = rewards.single_object_captions(args.eval_prompts, HELD_OUT_CAPTION_SEED)
        reward_table = all_rewards()
        dataset = build_synpic(work / "data", train_captions, args.generators, args.sampling_steps, args.guidance,
                               args.threads, [reward_table[name] for name in args.training_rewards])
        data_seconds = time.perf_counter() - started
        reward_models = list(reward_table.values())
        pipeline = load_pipeline()
        base_pictures = generate(pipeline, eval_captions, EVAL_NOISE_SEED, args.sampling_steps, args.guidance)
        base_scores = score_all(reward_models, base_pictures, eval_captions)
        results: dict[str, dict[str, list[float]]] = {loss: {} for loss in LOSSES}
        for seed in args.seeds:
            for loss in LOSSES:
                lora = train_one(dataset, work / f"{loss}-seed{seed}", loss, seed, args)
                if args.ship_loras and seed == args.seeds[0]:
                    SHIPPED_LORAS.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(lora, SHIPPED_LORAS / f".{loss}.safetensors.tmp")
                    os.replace(SHIPPED_LORAS / f".{loss}.safetensors.tmp", SHIPPED_LORAS / f"{loss}.safetensors")
                pipeline.load_lora_weights(str(lora), adapter_name=f"{loss}{seed}")
                pictures = generate(pipeline, eval_captions, EVAL_NOISE_SEED, args.sampling_steps, args.guidance)
                pipeline.unload_lora_weights()
                scores = score_all(reward_models, pictures, eval_captions)
                for name, values in scores.items():
                    results[loss].setdefault(f"win_{name}", []).append(win_rate(values, base_scores[name]))
                    results[loss].setdefault(f"mean_{name}", []).append(float(values.mean()))
                # how far the LoRA moved the pictures: mean |fine-tuned - base| over pixels and channels, in [0, 1]
                results[loss].setdefault("change", []).append(float((pictures - base_pictures).abs().mean()))
                print(loss, seed, {key: round(value[-1], 3) for key, value in results[loss].items()}, flush=True)
    numbers: dict[str, float] = {}
    for name, values in base_scores.items():
        numbers[f"base_mean_{name}"] = float(values.mean())
    for loss, table in results.items():
        for key, values in table.items():
            numbers[f"{loss}_{key}"] = statistics.mean(values)
            numbers[f"{loss}_{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            numbers[f"{loss}_{key}_min"] = min(values)
    judge = JUDGE
    numbers["ratio"] = numbers[f"rankdpo_win_{judge}"] / max(numbers[f"dpo_win_{judge}"], 1e-9)
    numbers.update(seeds=float(len(args.seeds)), steps=float(args.steps), train_prompts=float(args.train_prompts),
                   eval_prompts=float(args.eval_prompts), generators=float(args.generators),
                   data_seconds=data_seconds, seconds=time.perf_counter() - started, threads=float(args.threads))
    lines = []
    for loss in LOSSES:
        parts = [f"{name}{'' if name in args.training_rewards else ' (held out)'} "
                 f"{numbers[f'{loss}_win_{name}']:.3f}+-{numbers[f'{loss}_win_{name}_std']:.3f}"
                 for name in base_scores]
        lines.append(f"{loss} (lr {learning_rate(loss, args):g}) win rate vs base: " + ", ".join(parts)
                     + f"; judge mean {numbers[f'{loss}_mean_{judge}']:.3f}; mean pixel change "
                     f"{numbers[f'{loss}_change']:.3f}")
    summary = ("; ".join(lines) + f"; base judge mean {numbers[f'base_mean_{judge}']:.3f}; ratio (RankDPO / DPO win "
               f"rate under the held-out judge) {numbers['ratio']:.3f}; {len(args.seeds)} seeds x {args.steps} steps "
               f"x {args.batch_size} groups, k = {args.generators}, trained on {' + '.join(args.training_rewards)}, "
               f"{args.train_prompts} train / {args.eval_prompts} "
               f"held-out captions, beta {args.beta:g}, DCG ranks by the {args.dcg_ranks}; {args.threads} threads, "
               f"{numbers['seconds']:.0f} s")
    print(summary)
    if not args.no_write:
        write_results("rankdpo_toyworld", numbers,
                      "python benchmarks/rankdpo_toyworld.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                      summary)
    return numbers


if __name__ == "__main__":
    main()
