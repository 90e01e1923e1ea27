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

``ratio`` in the results JSON = PQ's pixel AUROC / the tower without surgery's. No target: the figures are read
against the ground truth and the baselines above, and RESULTS.md lines state none.

Run: python benchmarks/pq_aq_toyworld.py [--pictures 400] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import limit_threads, report  # noqa: E402

from comfyui_refinery.benchmarks.toyworld import data  # noqa: E402
from comfyui_refinery.benchmarks.toyworld.measures import (  # noqa: E402
    calibrated_a_bound, evaluate_aq, localisation,
)
from comfyui_refinery.benchmarks.toyworld.train_prompts import encode_in_batches, load_alpha  # noqa: E402
from comfyui_refinery.core import pq_map  # noqa: E402
from comfyui_refinery.core.clip_surgery import load_quality_clip  # noqa: E402

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
    return report("pq_aq_toyworld", numbers, summary, argv, write=not args.no_write)


if __name__ == "__main__":
    main()
