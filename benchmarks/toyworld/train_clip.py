"""Train the toy world's tiny open_clip ViT ("toy-clip") contrastively on scenes and captions.

Data, generated on the fly and deterministic from the seed and the step:
- positives: a scene and its caption; with probability ``--defect-rate`` one or two perceptual defects are
  injected and described the way a person would write it (``--descriptors human``: ", grainy", ", a broken
  triangle", ", washed-out colours", several phrasings per kind; ``v1``: one fixed phrase per kind), as web
  captions sometimes say what is wrong; some defective pictures are captioned by the quality words alone;
- hard negatives (text only, one per image): the same caption with one attribute changed (a colour, a shape, a
  count, the background or the relation), or with the defect descriptor removed / a wrong one added.
Loss: symmetric InfoNCE; images are scored against their batch's captions plus the hard negatives.

v2 (what ships) continues v1 with the text tower locked (``--init-from v1 --lock-text``): the text tower is the
frozen, pretrained text encoder tiny-sd v2 conditions on (``text_encoder.py``), and the image tower learns the
human quality words on top of it. The run is resumable: a checkpoint every ``--checkpoint-minutes`` in
``--work-dir``; the same command continues where it stopped (``--resume-from auto``) with the same result.

Writes ``models/toy-clip.json`` (open_clip config) and ``models/toy-clip.safetensors`` (fp16), loadable with
``comfyui_refinery.core.clip_surgery.load_quality_clip(path)`` (architecture "auto"), and
``models/toy-clip.metrics.json``.

Run (v1): python benchmarks/toyworld/train_clip.py --descriptors v1 --steps 2000
Run (v2): python benchmarks/toyworld/train_clip.py --init-from <v1 toy-clip.safetensors> --lock-text --steps 2500
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
from benchmarks.toyworld.resumable import (  # noqa: E402
    RESUME_CHOICES, PeriodicSaver, checkpoint_path, load_state, save_state,
)

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
# What a person would write about each defect ("{shape}" is the damaged item's shape); v2's captions.
HUMAN_DESCRIPTORS = {
    "blur_patch": ("with a blurry patch", "blurry", "out of focus", "a smudged blurry edge", "soft and blurred"),
    "noise_patch": ("with a noisy patch", "noisy", "grainy", "speckled with noise", "a patch of static"),
    "broken_shape": ("with a broken shape", "a broken {shape}", "a misshapen {shape}", "a cut {shape}",
                     "a deformed {shape}"),
    "colour_cast": ("with an unnatural colour", "washed-out colours", "a strange colour tint", "discoloured",
                    "an ugly colour cast"),
}
CLEAN_DESCRIPTORS = ("sharp and clean", "a clean picture", "high quality", "crisp edges")
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


def describe(kind: str, shape: str, rng: np.random.Generator, descriptors: str) -> str:
    """One description of a defect of ``kind`` on an item of ``shape`` (``descriptors``: "v1" or "human")."""
    if descriptors == "v1":
        return DESCRIPTORS[kind]
    options = HUMAN_DESCRIPTORS[kind]
    return options[int(rng.integers(len(options)))].format(shape=shape)


def training_example(
    seed: int, defect_rate: float, resolution: int = 64, phrase_rate: float = 0.0, descriptors: str = "v1"
) -> tuple[np.ndarray, str, str]:
    """(image (H, W, 3) uint8, positive caption, hard-negative caption) for one seed. ``descriptors="human"``
    (v2) adds a second defect to 30 % of the defective pictures, captions 20 % of them by their quality words
    alone (against another kind's words), and calls 15 % of the clean ones sharp and clean."""
    rng = np.random.default_rng(seed)
    scene = scenes.sample_scene(rng, resolution)
    image, text = scenes.render(scene), scenes.caption(scene)
    if rng.random() < phrase_rate:
        return (image, *phrase_pair(scene, rng))
    human = descriptors == "human"
    if rng.random() < defect_rate:
        if human:
            count = 2 if rng.random() < 0.3 else 1
            kinds = [PERCEPTUAL_KINDS[int(k)] for k in rng.permutation(len(PERCEPTUAL_KINDS))[:count]]
        else:  # v1's draw, kept so that v1 stays reproducible
            kinds = [PERCEPTUAL_KINDS[int(rng.integers(len(PERCEPTUAL_KINDS)))]]
        words = []
        for kind in kinds:
            defect = defects.INJECTORS[kind](image, scene, rng)
            image = defect.image
            words.append(describe(kind, defect.target_noun.rstrip("s"), rng, descriptors))
        described = ", ".join(words)
        others = [k for k in PERCEPTUAL_KINDS if k not in kinds]
        if human and rng.random() < 0.2:  # the quality words alone, against another kind's (or clean words)
            wrong = (describe(others[int(rng.integers(len(others)))], scene.objects[0].shape, rng, descriptors)
                     if rng.random() < 0.7 else CLEAN_DESCRIPTORS[int(rng.integers(len(CLEAN_DESCRIPTORS)))])
            return image, described, wrong
        positive = f"{text}, {described}"
        negative = text if rng.random() < 0.5 else f"{perturbed_caption(scene, rng)}, {described}"
        return image, positive, negative
    if rng.random() < 0.25:
        wrong = PERCEPTUAL_KINDS[int(rng.integers(len(PERCEPTUAL_KINDS)))]
        return image, text, f"{text}, {describe(wrong, scene.objects[0].shape, rng, descriptors)}"
    if human and rng.random() < 0.15:
        clean = CLEAN_DESCRIPTORS[int(rng.integers(len(CLEAN_DESCRIPTORS)))]
        return image, f"{text}, {clean}", perturbed_caption(scene, rng)
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
    parser.add_argument("--descriptors", choices=("human", "v1"), default="human",
                        help="how defects are described in captions: several human phrasings per kind (v2) or "
                        "v1's one fixed phrase")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from these toy-clip weights (a .safetensors of the same config)")
    parser.add_argument("--lock-text", action="store_true",
                        help="keep the text tower frozen (v2: it is tiny-sd's pretrained text encoder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=MODELS_DIR)
    parser.add_argument("--work-dir", type=Path, default=Path("toyworld-runs"),
                        help="where the resumable checkpoint lives (toy-clip.pt)")
    parser.add_argument("--resume-from", choices=RESUME_CHOICES, default="auto",
                        help="auto: continue from the checkpoint in --work-dir when there is one; never: start over")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop (with a checkpoint, without writing the model) after this many steps in all; "
                        "rerun to continue")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2:
        parser.error("--steps must be >= 1 and --batch-size >= 2")
    if args.init_from is not None and not args.init_from.is_file():
        parser.error(f"--init-from {args.init_from} is not a file")
    return args


def main(argv=None) -> dict[str, float] | None:
    import open_clip
    from safetensors.torch import load_file, save_file

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    config_path = args.output / f"{MODEL_NAME}.json"
    config_path.write_text(json.dumps(TOY_CLIP_CONFIG, indent=2) + "\n")
    open_clip.add_model_config(str(config_path))
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    if args.init_from is not None:
        model.load_state_dict({key: value.float() for key, value in load_file(str(args.init_from)).items()})
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    if args.lock_text:
        for name, parameter in model.named_parameters():
            if not (name.startswith("visual.") or name == "logit_scale"):
                parameter.requires_grad_(False)
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=0.1)

    def learning_rate(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)
    start = time.time()
    losses: list[float] = []
    first_step, seconds_before = 0, 0.0
    state_path = checkpoint_path(args.work_dir, MODEL_NAME)
    saved = load_state(state_path, args.resume_from)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        first_step, losses, seconds_before = saved["step"], list(saved["losses"]), saved["seconds"]
        print(f"toy-clip: resumed from {state_path} at step {first_step}")

    def save(step: int) -> None:
        save_state(state_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "schedule": schedule.state_dict(), "step": step, "losses": losses,
                                "seconds": seconds_before + time.time() - start})

    model.train()
    last = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    progress = tqdm(range(first_step, last), desc="toy-clip", initial=first_step, total=args.steps)
    saver = PeriodicSaver(60 * args.checkpoint_minutes, lambda: save(step + 1))
    for step in progress:
        base = (args.seed * args.steps + step) * args.batch_size
        batch = [training_example(base + index, args.defect_rate, phrase_rate=args.phrase_rate,
                                  descriptors=args.descriptors)
                 for index in range(args.batch_size)]
        images = to_pixels([image for image, _, _ in batch])
        loss = contrastive_loss(model, tokenizer, images, [p for _, p, _ in batch], [n for _, _, n in batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        saver.tick()
    if last < args.steps:
        save(last)
        print(f"toy-clip: stopped at step {last} of {args.steps}; rerun the same command to continue")
        return None
    save(args.steps)
    model.eval()
    metrics = {
        "training_seconds": seconds_before + time.time() - start,
        "steps": float(args.steps),
        "batch_size": float(args.batch_size),
        "final_loss": float(np.mean(losses[-100:])),
        "retrieval_10way": retrieval_accuracy(model, tokenizer),
        "retrieval_10way_hard": retrieval_accuracy(model, tokenizer, hard=True),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "text_locked": float(args.lock_text),
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
