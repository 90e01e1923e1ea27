"""How well PQ-Map and AQ-Map find the toy world's injected defects, against ground truth and baselines.

PQ-Map, on held-out pictures with 0-2 perceptual defects (blur, noise, broken shape, colour cast), toy-clip with its
learned prompts and calibrated per-factor alpha:
- pointing game: the pixel where 1 - P peaks lies in the defect mask (1 px tolerance); pictures with a defect;
- pixel AUROC of 1 - P against the defect mask, averaged over pictures with a defect;
- Spearman correlation of the score p with the graded quality label (1 - defective area), all pictures;
side by side with (a) a random map, (b) the same tower without surgery (plain CLIP patch tokens), (c) one alpha for
all three factors (the public Q-Refine script's behaviour), and (d) the plain-text prompt pairs.
AQ-Map, on held-out pictures that are correct or have a missing object, a wrong colour or a wrong count for their
caption: the rate at which the affected phrase gets the right defect type, the pointing game of A on the affected
region, and the false-flag rate on correct pictures; with the default a_bound 0.5 and with a_bound calibrated on
correct training pictures (5th percentile of their noun scores).

Run: python benchmarks/pq_aq_toyworld.py [--pictures 400]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import limit_threads, write_results  # noqa: E402

from comfyui_refinery.benchmarks.toyworld import data  # noqa: E402
from comfyui_refinery.benchmarks.toyworld.train_prompts import encode_in_batches, load_alpha  # noqa: E402
from comfyui_refinery.core import aq_map, pq_map  # noqa: E402
from comfyui_refinery.core.clip_surgery import load_quality_clip  # noqa: E402
from comfyui_refinery.core.masks import dilate  # noqa: E402

EXPECTED_DEFECT = {
    "missing_object": aq_map.NOUN_UNMATCHED,
    "wrong_colour": aq_map.ADJECTIVE_UNMATCHED,
    "wrong_count": aq_map.ADJECTIVE_UNMATCHED,
}


def pointing_hits(defect_scores: torch.Tensor, masks: torch.Tensor, tolerance: int = 1) -> np.ndarray:
    """defect_scores: (N, H, W) higher = more defective; masks: (N, H, W) bool. Hit = argmax inside the dilated mask."""
    grown = dilate(masks.float(), tolerance) > 0.5 if tolerance else masks
    flat = defect_scores.flatten(1).argmax(dim=1)
    return grown.flatten(1)[torch.arange(len(flat)), flat].numpy()


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC of ``scores`` for binary ``labels`` (ties count half)."""
    positives = labels.sum()
    negatives = labels.size - positives
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def localisation(defect_scores: torch.Tensor, masks: torch.Tensor) -> tuple[float, float]:
    """(pointing-game hit rate, mean per-picture pixel AUROC) over pictures with a defect."""
    has_defect = masks.flatten(1).any(dim=1)
    scores, truth = defect_scores[has_defect], masks[has_defect]
    hits = pointing_hits(scores, truth)
    aurocs = [auroc(s.flatten().numpy(), t.flatten().numpy()) for s, t in zip(scores, truth)]
    return float(hits.mean()), float(np.mean(aurocs))


def evaluate_pq(encoder, pictures, prompts, alpha, use_surgery=True) -> dict[str, float]:
    features = encode_in_batches(encoder, pictures.images, use_surgery=use_surgery)
    with torch.no_grad():
        result = pq_map.perceptual_quality(features, pq_map.encode_quality_prompts(encoder, prompts),
                                           encoder.logit_scale, alpha)
    pointing, area_under = localisation(1 - result.map, pictures.masks)
    return {
        "pointing": pointing,
        "auroc": area_under,
        "spearman": float(spearmanr(result.score.numpy(), pictures.area_quality.numpy()).statistic),
    }


def evaluate_random(pictures, seed: int = 0) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    random_map = torch.rand(pictures.masks.shape, generator=generator)
    pointing, area_under = localisation(random_map, pictures.masks)
    random_score = torch.rand(len(pictures.masks), generator=generator).numpy()
    return {"pointing": pointing, "auroc": area_under,
            "spearman": float(spearmanr(random_score, pictures.area_quality.numpy()).statistic)}


def evaluate_aq(encoder, cases, a_bound: float) -> dict[str, float]:
    flagged_right, hits, false_flags, flagged_pictures, phrases_on_correct = 0, [], 0, 0, 0
    defective = [case for case in cases if case.kind is not None]
    correct = [case for case in cases if case.kind is None]
    for case in cases:
        features = encoder.encode_image(case.image[None])
        result = aq_map.alignment_quality(encoder, features, [case.caption], a_bound=a_bound)
        rows = result.reports[0]
        if case.kind is None:
            flags = sum(row.defect is not None for row in rows)
            false_flags += flags
            phrases_on_correct += len(rows)
            flagged_pictures += int(flags > 0)
            continue
        target = [row for row in rows if row.noun == case.target_noun]
        flagged_right += int(any(row.defect == EXPECTED_DEFECT[case.kind] for row in target))
        if float(result.map.max()) > 0:
            hits.append(bool(pointing_hits(result.map, torch.from_numpy(case.mask)[None])[0]))
        else:
            hits.append(False)
    return {
        "right_flag_rate": flagged_right / max(1, len(defective)),
        "pointing": float(np.mean(hits)) if hits else 0.0,
        "false_flag_rate_phrases": false_flags / max(1, phrases_on_correct),
        "false_flag_rate_pictures": flagged_pictures / max(1, len(correct)),
    }


def calibrated_a_bound(encoder, count: int = 200, quantile: float = 0.05) -> float:
    """5th percentile of the noun scores a_pns on correct training pictures."""
    scores = []
    for case in data.alignment_cases(count * 4, data.TRAIN_SEED_OFFSET + 5 * 10**6)[::4]:  # the correct ones
        result = aq_map.alignment_quality(encoder, encoder.encode_image(case.image[None]), [case.caption])
        scores += [row.noun_score for row in result.reports[0]]
    return float(np.quantile(scores, quantile))


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pictures", type=int, default=400)
    parser.add_argument("--alignment-pictures", type=int, default=400)
    parser.add_argument("--checkpoint", type=Path, default=data.TOY_CLIP_CHECKPOINT)
    parser.add_argument("--prompts", type=Path, default=data.TOY_PROMPTS)
    parser.add_argument("--no-write", action="store_true", help="print only (for trying other models)")
    args = parser.parse_args(argv)
    cores = limit_threads()
    encoder = load_quality_clip(args.checkpoint)
    prompts = pq_map.load_prompt_embeddings(args.prompts)
    alpha = load_alpha(args.prompts)
    one_alpha = (float(np.mean(alpha)),) * 3
    pictures = data.perceptual_set(args.pictures, data.TEST_SEED_OFFSET)
    rows = {
        "pq": evaluate_pq(encoder, pictures, prompts, alpha),
        "random": evaluate_random(pictures),
        "no_surgery": evaluate_pq(encoder, pictures, prompts, alpha, use_surgery=False),
        "one_alpha": evaluate_pq(encoder, pictures, prompts, one_alpha),
        "text_prompts": evaluate_pq(encoder, pictures, pq_map.text_quality_prompts(), alpha),
    }
    cases = data.alignment_cases(args.alignment_pictures, data.TEST_SEED_OFFSET + 10**6)
    bound = calibrated_a_bound(encoder)
    aq_rows = {"aq_default": evaluate_aq(encoder, cases, 0.5), "aq_calibrated": evaluate_aq(encoder, cases, bound)}
    numbers = {f"{name}_{key}": value for name, row in {**rows, **aq_rows}.items() for key, value in row.items()}
    numbers.update({"ratio": rows["pq"]["auroc"] / max(rows["no_surgery"]["auroc"], 1e-9),
                    "calibrated_a_bound": bound, "pictures": float(args.pictures), "threads": float(cores)})
    lines = [f"{name:13s} pointing {row['pointing']:.3f}  AUROC {row['auroc']:.3f}  Spearman(p) {row['spearman']:.3f}"
             for name, row in rows.items()]
    lines += [f"{name:13s} " + "  ".join(f"{key} {value:.3f}" for key, value in row.items())
              for name, row in aq_rows.items()]
    print("\n".join(lines))
    summary = (
        f"PQ pointing {rows['pq']['pointing']:.3f} / AUROC {rows['pq']['auroc']:.3f} / Spearman {rows['pq']['spearman']:.3f} "
        f"(random {rows['random']['pointing']:.3f}/{rows['random']['auroc']:.3f}, no surgery "
        f"{rows['no_surgery']['pointing']:.3f}/{rows['no_surgery']['auroc']:.3f}, one alpha "
        f"{rows['one_alpha']['pointing']:.3f}/{rows['one_alpha']['auroc']:.3f}/{rows['one_alpha']['spearman']:.3f}); "
        f"AQ right-flag {aq_rows['aq_calibrated']['right_flag_rate']:.3f}, pointing {aq_rows['aq_calibrated']['pointing']:.3f}, "
        f"false flags {aq_rows['aq_calibrated']['false_flag_rate_phrases']:.3f} (a_bound {bound:.3f})"
    )
    if not args.no_write:
        write_results("pq_aq_toyworld", numbers, summary, argv)
    return numbers


if __name__ == "__main__":
    main()
