"""``refinery-synpic``: build a Syn-Pic ranked preference dataset (rankdpo.txt sec. 3.2, Algorithm 1 of A.6).

For every prompt, each of the k generators draws one picture; each of the n rewards scores every picture; the
Syn-Pic win rate ``phi_i = wins_i / (n (k - 1))`` (``core/reward_aggregation.syn_pic_win_rates``) ranks the k
pictures. Output in ``--output-dir``:

- ``images/p<prompt:06d>_g<generator:02d>.png``;
- ``index.jsonl``, one line per prompt: ``{"prompt", "images" (paths relative to the folder, in generator order),
  "win_rates", "scores" {reward name: [k]}, "generators" [k names], "seeds" [k]}`` -- what
  ``refinery-train-rankdpo`` reads;
- ``synpic_config.json``: the options and the reward names.

Deterministic: the noise of (prompt i, generator g) comes from a generator seeded by (``--seed``, g's seed, i) only,
and prompts are drawn in fixed batches (prompts ``[b * j, b * (j + 1))``), so a resumed run gives the very pixels of
an uninterrupted one. Resumable: pictures are written to a temporary name and renamed; a rerun with the same options
draws only the batches with missing pictures (one generator in memory at a time), then scores everything again and
rewrites ``index.jsonl`` atomically.

Example::

    refinery-synpic --prompts prompts.txt --model models/checkpoints/sd15.safetensors --seeds 4 \
        --reward models/reward_models/HPS_v2.1_compressed.pt --reward models/reward_models/PickScore_v1 \
        --output-dir data/synpic --steps 30 --guidance-scale 7.5
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ...core.reward_aggregation import syn_pic_win_rates
from ..common.atomic import atomic_write_json, atomic_write_text
from ..common.config import config_to_dict
from ..common.lora import LoraMismatchError, check_lora_file
from ..common.model_loading import UnsupportedModelError, detect_family
from .config import CONFIG_FILE, SynPicConfig, parse_args
from .generators import draw, load_generator, native_size, picture_seed

logger = logging.getLogger(__name__)

INDEX_FILE = "index.jsonl"
IMAGES_DIR = "images"
# options that change no pixel: a rerun may change them freely
NON_PIXEL_OPTIONS = ("rewards", "output_dir", "device", "threads", "overwrite", "reward_batch_size", "batch_size")


class SynPicError(ValueError):
    """The run cannot start or continue; the message says what to change."""


def read_prompts(path: Path) -> list[str]:
    """Prompts of a .txt (one per line; blank and '#' lines skipped) or .jsonl ({"prompt": str} per line) file.
    SynPicError listing bad lines with their numbers, or for a file without prompts."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SynPicError(f"Cannot read --prompts '{path}': {error}") from error
    prompts, problems = [], []
    jsonl = Path(path).suffix.lower() == ".jsonl"
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or (not jsonl and stripped.startswith("#")):
            continue
        if not jsonl:
            prompts.append(stripped)
            continue
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as error:
            problems.append(f"line {number}: malformed JSON ({error.msg})")
            continue
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"line {number}: needs a non-empty string 'prompt'")
            continue
        prompts.append(prompt.strip())
    if problems:
        raise SynPicError(f"--prompts '{path}' has {len(problems)} bad line(s):\n  " + "\n  ".join(problems[:25]))
    if not prompts:
        raise SynPicError(f"--prompts '{path}' holds no prompt.")
    return prompts


def image_name(prompt_index: int, generator_index: int) -> str:
    return f"{IMAGES_DIR}/p{prompt_index:06d}_g{generator_index:02d}.png"


def _pixel_options(config: SynPicConfig) -> dict:
    options = config_to_dict(config)
    return {key: value for key, value in options.items() if key not in NON_PIXEL_OPTIONS}


def prepare_output(config: SynPicConfig) -> None:
    """Create the output folder (check it is writable) and its config file; refuse a folder made with options that
    change pixels, unless --overwrite (which deletes its images and index)."""
    folder = config.output_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise SynPicError(f"Cannot write into --output-dir '{folder}' ({error.strerror or error}). Choose a writable "
                          f"folder with free space.") from error
    existing = folder / CONFIG_FILE
    current = _pixel_options(config)
    if existing.is_file():
        try:
            previous = {key: value for key, value in json.loads(existing.read_text(encoding="utf-8")).items()
                        if key not in NON_PIXEL_OPTIONS and key != "reward_names"}
        except ValueError:
            previous = {}
        if previous != current:
            changed = sorted(key for key in set(previous) | set(current) if previous.get(key) != current.get(key))
            if not config.overwrite:
                raise SynPicError(f"'{folder}' holds a Syn-Pic run made with other options ({', '.join(changed)} "
                                  f"differ). Continue it with the same options, choose another --output-dir, or "
                                  f"pass --overwrite to start over (deletes its images).")
            shutil.rmtree(folder / IMAGES_DIR, ignore_errors=True)
            (folder / INDEX_FILE).unlink(missing_ok=True)
    (folder / IMAGES_DIR).mkdir(exist_ok=True)


def _save_png(picture: torch.Tensor, path: Path) -> None:
    """(H, W, 3) in [0, 1] -> 8-bit PNG, written to a temporary name and renamed (never a half-written file)."""
    from PIL import Image

    temporary = path.with_name(path.name + ".tmp")
    array = (picture.numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(temporary, format="PNG")
    os.replace(temporary, path)


def _load_png(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as opened:
        return torch.from_numpy(np.asarray(opened.convert("RGB"), dtype=np.uint8).copy()).float() / 255.0


def _resolve_device(config: SynPicConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    dtype = names.get(config.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    return device, dtype


def generate_pictures(config: SynPicConfig, prompts: Sequence[str]) -> int:
    """Draw every missing picture, one generator (pipeline) in memory at a time. Returns how many were drawn."""
    from tqdm.auto import tqdm

    device, dtype = _resolve_device(config)
    folder = config.output_dir
    batches = [list(range(start, min(start + config.batch_size, len(prompts))))
               for start in range(0, len(prompts), config.batch_size)]
    drawn = 0
    for generator_index, spec in enumerate(config.generators):
        todo = [batch for batch in batches
                if any(not (folder / image_name(index, generator_index)).is_file() for index in batch)]
        if not todo:
            continue
        pipeline = load_generator(spec, device, dtype)
        height, width = native_size(pipeline)
        height, width = config.height or height, config.width or width
        progress = tqdm(todo, desc=f"generator {spec.name}", unit="batch")
        for batch in progress:
            seeds = [picture_seed(config.seed, spec.seed, index) for index in batch]
            pictures = draw(pipeline, [prompts[index] for index in batch], seeds,
                            steps=spec.steps or config.steps,
                            guidance_scale=config.guidance_scale if spec.guidance_scale is None else spec.guidance_scale,
                            height=height, width=width, negative_prompt=config.negative_prompt)
            for index, picture in zip(batch, pictures):
                path = folder / image_name(index, generator_index)
                if not path.is_file():
                    _save_png(picture, path)
                    drawn += 1
        del pipeline
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return drawn


def score_pictures(config: SynPicConfig, prompts: Sequence[str], reward_models: Sequence) -> dict[str, torch.Tensor]:
    """Every reward on every picture (read back from the PNGs, as the trainer will): {name: (P, k)}."""
    from tqdm.auto import tqdm

    device, _ = _resolve_device(config)
    k = len(config.generators)
    paths = [config.output_dir / image_name(index, generator) for index in range(len(prompts)) for generator in range(k)]
    repeated = [prompt for prompt in prompts for _ in range(k)]
    scores = {}
    for reward in reward_models:
        reward.to(device)
        values = []
        for start in tqdm(range(0, len(paths), config.reward_batch_size), desc=f"reward {reward.name}", unit="batch"):
            pictures = torch.stack([_load_png(path) for path in paths[start : start + config.reward_batch_size]])
            with torch.no_grad():
                values.append(reward.score(pictures.to(device), repeated[start : start + config.reward_batch_size])
                              .float().cpu())
        reward.to("cpu")
        scores[reward.name] = torch.cat(values).view(len(prompts), k)
    return scores


def write_index(config: SynPicConfig, prompts: Sequence[str], scores: dict[str, torch.Tensor]) -> Path:
    """``index.jsonl`` (module docstring) with the Syn-Pic win rates, atomically."""
    k = len(config.generators)
    stacked = torch.stack(list(scores.values()), dim=1)  # (P, n, k)
    win_rates = syn_pic_win_rates(stacked)  # (P, k)
    lines = []
    for index, prompt in enumerate(prompts):
        lines.append(json.dumps({
            "prompt": prompt,
            "images": [image_name(index, generator) for generator in range(k)],
            "win_rates": [round(float(value), 6) for value in win_rates[index]],
            "scores": {name: [float(value) for value in table[index]] for name, table in scores.items()},
            "generators": [spec.name for spec in config.generators],
            "seeds": [picture_seed(config.seed, spec.seed, index) for spec in config.generators],
        }))
    return atomic_write_text(config.output_dir / INDEX_FILE, "\n".join(lines) + "\n")


def build_dataset(config: SynPicConfig, reward_models: Sequence | None = None) -> Path:
    """Run Syn-Pic for ``config``. reward_models: already-loaded rewards (objects with ``name`` and
    ``score(images (B, H, W, 3) in [0, 1], prompts) -> (B,)``, e.g. ``core/rewards`` models), else the config's
    reward files are loaded. Returns the path of ``index.jsonl``."""
    from ...core.rewards.loading import load_reward_model

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    prompts = read_prompts(config.prompts)
    if reward_models is None:
        if not config.rewards:
            raise SynPicError("No reward model: pass at least one --reward.")
        try:
            reward_models = [load_reward_model(path, kind) for path, kind in config.rewards]
        except (FileNotFoundError, ValueError) as error:
            raise SynPicError(f"Cannot load a reward model: {error}") from error
    for spec in config.generators:
        if spec.lora is not None:
            try:
                check_lora_file(spec.lora, detect_family(spec.model))
            except (LoraMismatchError, UnsupportedModelError, FileNotFoundError) as error:
                raise SynPicError(f"Generator '{spec.name}': {error}") from error
    names = [reward.name for reward in reward_models]
    if len(set(names)) != len(names):
        raise SynPicError(f"Reward names must be distinct (they key the scores), got {names}: rename the files.")
    prepare_output(config)
    atomic_write_json(config.output_dir / CONFIG_FILE, {**config_to_dict(config), "reward_names": names})
    drawn = generate_pictures(config, prompts)
    logger.info("Drew %d picture(s); %d prompt(s) x %d generator(s) in all.", drawn, len(prompts),
                len(config.generators))
    scores = score_pictures(config, prompts, reward_models)
    index = write_index(config, prompts, scores)
    logger.info("Wrote %s", index)
    return index


def main(input_args: list[str] | None = None) -> Path:
    """Console entry point: bad flags exit with status 2, an unusable prompts file, reward or output folder with
    status 1 and a message."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(input_args)
    try:
        index = build_dataset(config)
    except (SynPicError, LoraMismatchError) as error:
        raise SystemExit(f"refinery-synpic: error: {error}") from error
    print(f"Wrote {index}")
    return index


if __name__ == "__main__":
    main()
