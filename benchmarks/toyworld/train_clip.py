"""Train the toy world's tiny open_clip ViT ("toy-clip") contrastively on scenes and captions.

Data, generated on the fly and deterministic from the seed:
- positives: a scene and its caption; with probability ``--defect-rate`` one perceptual defect is injected and its
  descriptor appended to the caption (", with a blurry patch"), as web captions sometimes say what is wrong;
- hard negatives (text only, one per image): the same caption with one attribute changed (a colour, a shape, a
  count, the background or the relation), or with the defect descriptor removed / a wrong one added.
Loss: symmetric InfoNCE; images are scored against their batch's captions plus the hard negatives.

Writes ``models/toy-clip.json`` (open_clip config) and ``models/toy-clip.safetensors`` (fp16), loadable with
``comfyui_refinery.core.clip_surgery.load_quality_clip(path)`` (architecture "auto"), and
``models/toy-clip.metrics.json``.

Run: python benchmarks/toyworld/train_clip.py [--steps 2000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.toyworld import defects, scenes  # noqa: E402

MODELS_DIR = Path(__file__).resolve().parent / "models"
MODEL_NAME = "toy-clip"
TOY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}
PERCEPTUAL_KINDS = ("blur_patch", "noise_patch", "broken_shape", "colour_cast")
DESCRIPTORS = {
    "blur_patch": "with a blurry patch",
    "noise_patch": "with a noisy patch",
    "broken_shape": "with a broken shape",
    "colour_cast": "with an unnatural colour",
}
HELD_OUT_SEED_OFFSET = 10**9
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


def perturbed_caption(scene: scenes.Scene, rng: np.random.Generator) -> str:
    """The caption of ``scene`` with exactly one attribute changed (a hard negative)."""
    group = int(rng.integers(len(scene.objects)))
    obj = scene.objects[group]
    choices = ["colour", "shape", "count", "background"] + (["relation"] if scene.relation else [])
    what = choices[int(rng.integers(len(choices)))]
    if what == "background":
        options = [b for b in scenes.BACKGROUNDS if b != scene.background]
        return scenes.caption(replace(scene, background=options[int(rng.integers(len(options)))]))
    if what == "relation":
        options = [r for r in scenes.RELATIONS if r != scene.relation]
        return scenes.caption(replace(scene, relation=options[int(rng.integers(len(options)))]))
    if what == "colour":
        options = [c for c in scenes.COLOURS if c != obj.colour]
        changed = replace(obj, colour=options[int(rng.integers(len(options)))])
    elif what == "shape":
        taken = {o.shape for o in scene.objects}
        options = [s for s in scenes.SHAPES if s not in taken]
        changed = replace(obj, shape=options[int(rng.integers(len(options)))])
    else:
        options = [c for c in scenes.COUNT_WORDS if c != obj.count]
        count = options[int(rng.integers(len(options)))]
        changed = replace(obj, count=count, centres=(obj.centres * 3)[:count])
    objects = list(scene.objects)
    objects[group] = changed
    return scenes.caption(replace(scene, objects=tuple(objects)))


def phrase_pair(scene: scenes.Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A short true phrase about ``scene`` (an object phrase, a bare noun, or the background) and a false one of
    the same kind: web captions are often that short, and the AQ-Map scores exactly such phrases (eq. 5)."""
    what = int(rng.integers(3))
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    if what == 2:
        options = [b for b in scenes.BACKGROUNDS if b != scene.background]
        return f"a {scenes.background_phrase(scene)}", f"a {options[int(rng.integers(len(options)))]} background"
    absent = [shape for shape in scenes.SHAPES if shape not in {o.shape for o in scene.objects}]
    if what == 1:
        wrong = replace(obj, shape=absent[int(rng.integers(len(absent)))])
        return obj.noun, wrong.noun
    colours = [c for c in scenes.COLOURS if c != obj.colour]
    counts = [c for c in scenes.COUNT_WORDS if c != obj.count]
    wrong = (replace(obj, colour=colours[int(rng.integers(len(colours)))]) if rng.random() < 0.5
             else replace(obj, count=counts[int(rng.integers(len(counts)))]))
    return obj.phrase, wrong.phrase


def training_example(
    seed: int, defect_rate: float, resolution: int = 64, phrase_rate: float = 0.0
) -> tuple[np.ndarray, str, str]:
    """(image (H, W, 3) uint8, positive caption, hard-negative caption) for one seed."""
    rng = np.random.default_rng(seed)
    scene = scenes.sample_scene(rng, resolution)
    image, text = scenes.render(scene), scenes.caption(scene)
    if rng.random() < phrase_rate:
        return (image, *phrase_pair(scene, rng))
    if rng.random() < defect_rate:
        kind = PERCEPTUAL_KINDS[int(rng.integers(len(PERCEPTUAL_KINDS)))]
        image = defects.INJECTORS[kind](image, scene, rng).image
        positive = f"{text}, {DESCRIPTORS[kind]}"
        negative = text if rng.random() < 0.5 else f"{perturbed_caption(scene, rng)}, {DESCRIPTORS[kind]}"
        return image, positive, negative
    if rng.random() < 0.25:
        wrong = PERCEPTUAL_KINDS[int(rng.integers(len(PERCEPTUAL_KINDS)))]
        return image, text, f"{text}, {DESCRIPTORS[wrong]}"
    return image, text, perturbed_caption(scene, rng)


def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) pictures -> (B, 3, H, W) normalised tower input (CLIP mean/std; 64 px needs no resize)."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (batch - MEAN) / STD


def contrastive_loss(model, tokenizer, images, positives, negatives) -> torch.Tensor:
    """Symmetric InfoNCE with text-only hard negatives: images (B, 3, H, W), 2 x B captions. Returns a scalar."""
    image_features = F.normalize(model.encode_image(images), dim=-1)  # (B, D)
    text_features = F.normalize(model.encode_text(tokenizer(positives + negatives)), dim=-1)  # (2B, D)
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * image_features @ text_features.T  # (B, 2B)
    targets = torch.arange(len(positives))
    image_to_text = F.cross_entropy(logits, targets)
    text_to_image = F.cross_entropy(logits[:, : len(positives)].T, targets)
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, count: int = 200, ways: int = 10, hard: bool = False, seed: int = 0) -> float:
    """Fraction of held-out clean scenes whose caption scores highest among ``ways`` candidates: the captions of
    ``ways - 1`` other held-out scenes, or (hard) ``ways - 1`` one-attribute perturbations of its own caption."""
    rng = np.random.default_rng(seed)
    samples = [scenes.generate(HELD_OUT_SEED_OFFSET + index) for index in range(count)]
    image_features = F.normalize(model.encode_image(to_pixels([image for image, _, _ in samples])), dim=-1)
    correct = 0
    for index, (_, text, scene) in enumerate(samples):
        if hard:
            candidates = [text] + [perturbed_caption(scene, rng) for _ in range(ways - 1)]
        else:
            others = rng.choice([j for j in range(count) if j != index], size=ways - 1, replace=False)
            candidates = [text] + [samples[j][1] for j in others]
        text_features = F.normalize(model.encode_text(tokenizer(candidates)), dim=-1)
        correct += int((text_features @ image_features[index]).argmax() == 0)
    return correct / count


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the toy world's tiny CLIP.")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--defect-rate", type=float, default=0.4)
    parser.add_argument("--phrase-rate", type=float, default=0.3,
                        help="fraction of examples captioned by one short phrase (object, noun or background)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=MODELS_DIR)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2:
        parser.error("--steps must be >= 1 and --batch-size >= 2")
    return args


def main(argv=None) -> dict[str, float]:
    import open_clip
    from safetensors.torch import save_file

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    config_path = args.output / f"{MODEL_NAME}.json"
    config_path.write_text(json.dumps(TOY_CLIP_CONFIG, indent=2) + "\n")
    open_clip.add_model_config(str(config_path))
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.1)

    def learning_rate(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)
    start = time.time()
    losses = []
    model.train()
    progress = tqdm(range(args.steps), desc="toy-clip")
    for step in progress:
        base = (args.seed * args.steps + step) * args.batch_size
        batch = [training_example(base + index, args.defect_rate, phrase_rate=args.phrase_rate)
                 for index in range(args.batch_size)]
        images = to_pixels([image for image, _, _ in batch])
        loss = contrastive_loss(model, tokenizer, images, [p for _, p, _ in batch], [n for _, _, n in batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    model.eval()
    metrics = {
        "training_seconds": time.time() - start,
        "steps": float(args.steps),
        "batch_size": float(args.batch_size),
        "final_loss": float(np.mean(losses[-100:])),
        "retrieval_10way": retrieval_accuracy(model, tokenizer),
        "retrieval_10way_hard": retrieval_accuracy(model, tokenizer, hard=True),
        "logit_scale": float(model.logit_scale.detach().exp()),
    }
    checkpoint = args.output / f"{MODEL_NAME}.safetensors"
    temporary = checkpoint.with_name(checkpoint.name + ".tmp")
    save_file({key: value.half().contiguous() for key, value in model.state_dict().items()}, str(temporary))
    os.replace(temporary, checkpoint)
    (args.output / f"{MODEL_NAME}.metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
