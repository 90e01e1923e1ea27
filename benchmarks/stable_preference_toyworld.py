"""Stable Preference vs plain cross-entropy, training a reward from the toy world's CLIP on noisy preference pairs.

Data (``benchmarks/toyworld/preference_data.py``): each pair is one scene with fewer vs more injected defects
(preferred = fewer), prompt = the scene's caption; 20 % of the training labels are flipped (seeded), the held-out
test pairs are clean. Three runs start from ``toy-clip`` with the same seed, steps, batch size, learning rate,
schedule and layer freezing; only the loss differs: cross-entropy (L_pref), the two-step loss without L_ai (Table 2's
ablation), and the full method (two-step loss on L_pref + L_ai, k = 3 weak views).

Measured on the clean test pairs, as in stable-preference.txt Table 1:
- pairwise accuracy on the originals (ORG);
- accuracy when both images are flipped horizontally and centre-cropped to a side ratio of 0.97 / 0.95 / 0.93 /
  0.90 and resized back (HP&CC), and the mean change against ORG;
- decision consistency under the training-time weak augmentation (random resized crop, area [0.85, 1], random
  flip; 3 independent views per image): the fraction of views whose choice equals the choice on the originals;
- score spread: mean |cos(view) - cos(original)| of those views (cosine units, so the two models' temperatures do not
  matter);
and, on the training pairs whose label was flipped, the rate at which the model sides with the wrong label
(fitting the noise). The untrained toy-clip is reported as the zero-shot reference. ``ratio`` in the results JSON =
the full method's clean accuracy / cross-entropy's. No target: a small-scale check of the mechanism (below), and
RESULTS.md lines state none.

Default run: 1500 training / 500 test pairs, 250 steps of batch 16 (2.7 epochs), lr 5e-5 with 5 % warm-up and
cosine decay, weight decay 0.2, last 2 of 4 image and last 2 of 3 text blocks trainable; about 4 minutes of CPU on
1 thread, 10-12 minutes wall on a busy 2-core machine (the full method does 8 image forwards per pair against 2 for
cross-entropy: about 1 s against 0.3 s per step). The paper trains 30,000 steps of batch 64: this is a
small-scale check of the mechanism, not a reproduction of its numbers.

Run: python benchmarks/stable_preference_toyworld.py [--steps 250] [--threads 1] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from comfyui_refinery.benchmarks.toyworld import data, preference_data  # noqa: E402
from comfyui_refinery.core import stable_preference as sp  # noqa: E402
from comfyui_refinery.core.clip_surgery import load_quality_clip  # noqa: E402
from comfyui_refinery.trainers.stable_preference import train as trainer  # noqa: E402
from comfyui_refinery.trainers.stable_preference.data import load_image, read_pairs  # noqa: E402

CROP_RATIOS = (0.97, 0.95, 0.93, 0.90)
VIEWS = 3
EVALUATION_SEED = 12345


def flip_center_crop(images: torch.Tensor, side_ratio: float) -> torch.Tensor:
    """Table 1's perturbation: horizontal flip, centre crop to ``side_ratio`` of each side, resize back.
    images: (N, 3, H, W) -> (N, 3, H, W)."""
    height, width = images.shape[-2:]
    crop_h, crop_w = round(side_ratio * height), round(side_ratio * width)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    crop = images.flip(-1)[..., top : top + crop_h, left : left + crop_w]
    return F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


class Scorer:
    """Cosine scores of a CLIP reward: images (N, 3, H, W) in [0, 1] against per-image prompts."""

    def __init__(self, checkpoint: Path):
        encoder = load_quality_clip(checkpoint)
        self.model, self.tokenizer = encoder.model.eval(), encoder.tokenizer
        self.mean, self.std = trainer.normalisation(self.model)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], batch: int = 256) -> torch.Tensor:
        text = F.normalize(self.model.encode_text(self.tokenizer(prompts)), dim=-1)  # (N, D)
        scores = []
        for start in range(0, len(images), batch):
            pixels = (images[start : start + batch] - self.mean) / self.std
            image = F.normalize(self.model.encode_image(pixels), dim=-1)  # (b, D)
            scores.append((image * text[start : start + batch]).sum(-1))
        return torch.cat(scores)


def load_split(folder: Path, size: tuple[int, int] = (64, 64)) -> tuple[torch.Tensor, torch.Tensor, list[str], list[bool]]:
    """(preferred (N, 3, H, W), rejected (N, 3, H, W), prompts, flipped flags) of a written split."""
    pairs = read_pairs(folder)
    flipped = [bool(json.loads(line).get("flipped", False))
               for line in (folder / "pairs.jsonl").read_text().splitlines() if line.strip()]
    preferred = torch.stack([load_image(pair.preferred, size) for pair in pairs])
    rejected = torch.stack([load_image(pair.rejected, size) for pair in pairs])
    return preferred, rejected, [pair.prompt for pair in pairs], flipped


def evaluate(scorer: Scorer, test, flipped_train) -> dict[str, float]:
    preferred, rejected, prompts, _ = test
    base = scorer(preferred, prompts) - scorer(rejected, prompts)  # (N,) cosine margins
    numbers = {"acc_org": float((base > 0).float().mean())}
    for ratio in CROP_RATIOS:
        margin = scorer(flip_center_crop(preferred, ratio), prompts) - scorer(flip_center_crop(rejected, ratio), prompts)
        numbers[f"acc_hpcc_{ratio:.2f}"] = float((margin > 0).float().mean())
    numbers["acc_hpcc_mean_change"] = sum(numbers[f"acc_hpcc_{r:.2f}"] for r in CROP_RATIOS) / len(CROP_RATIOS) - \
        numbers["acc_org"]
    generator = torch.Generator().manual_seed(EVALUATION_SEED)
    views_p = sp.weak_augment(preferred, VIEWS, generator)  # (N, k, 3, H, W)
    views_r = sp.weak_augment(rejected, VIEWS, generator)
    agree, spread = [], []
    original_p, original_r = scorer(preferred, prompts), scorer(rejected, prompts)
    for view in range(VIEWS):
        sp_view, sr_view = scorer(views_p[:, view], prompts), scorer(views_r[:, view], prompts)
        agree.append(((sp_view - sr_view > 0) == (base > 0)).float())
        spread += [(sp_view - original_p).abs(), (sr_view - original_r).abs()]
    numbers["view_consistency"] = float(torch.stack(agree).mean())
    numbers["view_score_spread"] = float(torch.stack(spread).mean())
    numbers["margin_mean"] = float(base.mean())
    if flipped_train is not None:
        noisy_p, noisy_r, noisy_prompts = flipped_train
        numbers["noise_fit"] = float((scorer(noisy_p, noisy_prompts) > scorer(noisy_r, noisy_prompts)).float().mean())
    return numbers


RUNS = {  # name -> the trainer flags that differ between the runs
    "cross_entropy": ["--loss", "cross-entropy"],
    "two_step_only": ["--loss", "stable-preference", "--no-anti-interference"],  # Table 2 ablation: no L_ai
    "stable_preference": ["--loss", "stable-preference"],  # the full method
}


def run_training(flags: list[str], train_dir: Path, output: Path, args) -> tuple[Path, float]:
    start = time.perf_counter()
    path = trainer.run([
        "--dataset", str(train_dir), "--checkpoint", str(args.checkpoint), "--output-dir", str(output),
        *flags, "--max-train-steps", str(args.steps), "--train-batch-size", str(args.batch_size),
        "--learning-rate", str(args.learning_rate), "--seed", str(args.seed), "--threads", str(args.threads),
        "--trainable-image-layers", str(args.image_layers), "--trainable-text-layers", str(args.text_layers),
        "--checkpointing-steps", str(args.steps), "--checkpoints-total-limit", "1", "--log-every", "25",
    ])
    return path, time.perf_counter() - start


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--image-layers", type=int, default=2)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--train-pairs", type=int, default=1500)
    parser.add_argument("--test-pairs", type=int, default=500)
    parser.add_argument("--flip-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", type=Path, default=data.TOY_CLIP_CHECKPOINT)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data and models here (default: temp)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        work = args.workdir or Path(temporary)
        train_dir, test_dir = preference_data.build_splits(work / "data", args.train_pairs, args.test_pairs,
                                                           args.flip_fraction, args.seed)
        test = load_split(test_dir)
        train_p, train_r, train_prompts, flipped = load_split(train_dir)
        index = torch.tensor([i for i, f in enumerate(flipped) if f], dtype=torch.long)
        noisy = (train_p[index], train_r[index], [train_prompts[i] for i in index.tolist()]) if len(index) else None
        rows = {"zero_shot": evaluate(Scorer(args.checkpoint), test, noisy)}
        seconds = {}
        for name, flags in RUNS.items():
            path, seconds[name] = run_training(flags, train_dir, work / name, args)
            rows[name] = evaluate(Scorer(path), test, noisy)
    numbers = {f"{name}_{key}": value for name, row in rows.items() for key, value in row.items()}
    numbers.update({f"{name}_train_seconds": value for name, value in seconds.items()})
    ce, ablation, full = rows["cross_entropy"], rows["two_step_only"], rows["stable_preference"]
    numbers.update({
        "ratio": full["acc_org"] / max(ce["acc_org"], 1e-9),
        "steps": float(args.steps), "batch_size": float(args.batch_size), "train_pairs": float(args.train_pairs),
        "test_pairs": float(args.test_pairs), "flip_fraction": args.flip_fraction, "threads": float(args.threads),
        "total_seconds": time.perf_counter() - started,
    })
    header = f"{'':18s} {'ORG':>6s} " + " ".join(f"HP&CC{r:.2f}" for r in CROP_RATIOS) + \
        "  change  consist  spread  noise-fit"
    lines = [header] + [
        f"{name:18s} {row['acc_org']:6.3f} " + " ".join(f"{row[f'acc_hpcc_{r:.2f}']:10.3f}" for r in CROP_RATIOS)
        + f"  {row['acc_hpcc_mean_change']:+.3f}  {row['view_consistency']:.3f}    {row['view_score_spread']:.4f}"
        + f"  {row.get('noise_fit', float('nan')):.3f}"
        for name, row in rows.items()
    ]
    print("\n".join(lines))
    summary = (
        f"clean held-out pair accuracy: Stable Preference {full['acc_org']:.3f} vs cross-entropy {ce['acc_org']:.3f} "
        f"(ratio {numbers['ratio']:.3f}; two-step without L_ai {ablation['acc_org']:.3f}; zero-shot toy-clip "
        f"{rows['zero_shot']['acc_org']:.3f}); under flip + "
        f"centre crop 0.97-0.90 mean change {full['acc_hpcc_mean_change']:+.3f} vs {ce['acc_hpcc_mean_change']:+.3f}; "
        f"weak-view decision consistency {full['view_consistency']:.3f} vs {ce['view_consistency']:.3f}; fits flipped "
        f"training labels {full.get('noise_fit', float('nan')):.3f} vs {ce.get('noise_fit', float('nan')):.3f}; "
        f"{args.train_pairs} pairs ({args.flip_fraction:.0%} flipped), {args.steps} steps x {args.batch_size}, "
        f"{args.threads} thread(s), training {seconds['cross_entropy']:.0f} s (CE), {seconds['two_step_only']:.0f} s, "
        f"{seconds['stable_preference']:.0f} s (full)"
    )
    return report("stable_preference_toyworld", numbers, summary, argv, write=not args.no_write)


if __name__ == "__main__":
    main()
