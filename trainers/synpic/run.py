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

import dataclasses
import gc
import json
import logging
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ...core.reward_aggregation import syn_pic_win_rates
from ..common.atomic import atomic_write_json, atomic_write_text
from ..common.config import SetupError, check_writable_folder, config_to_dict
from ..common.console import EXIT_INTERRUPTED, EXIT_OK, LOG_FORMAT, invoked_as
from ..common.data import INDEX_FILE, DatasetError, read_prompts, save_png
from ..common.lora import LoraMismatchError, check_lora_file
from ..common.model_loading import UnsupportedModelError, detect_family
from .config import CONFIG_FILE, SynPicConfig, parse_args
from .generators import draw, load_generator, native_size, picture_seed

logger = logging.getLogger(__name__)

IMAGES_DIR = "images"
PROG = "refinery-synpic"
# options that change no pixel: a rerun may change them freely. Not --batch-size: pictures drawn in batches of
# another size differ by one level in a few pixels (float rounding), so a dataset is drawn with one batch size.
NON_PIXEL_OPTIONS = ("rewards", "output_dir", "device", "threads", "overwrite", "reward_batch_size")


class SynPicError(SetupError):
    """The run cannot start or continue; the message says what to change."""


class SynPicInterrupted(KeyboardInterrupt):
    """Ctrl-C during a Syn-Pic run. phase: "drawing" or "scoring"; saved / total: pictures on disk / in the dataset
    (every saved picture is complete: they are written to a temporary name and renamed)."""

    def __init__(self, phase: str, saved: int, total: int, folder: Path):
        super().__init__(f"interrupted while {phase}: {saved} of {total} pictures saved")
        self.phase, self.saved, self.total, self.folder = phase, saved, total, folder


def image_name(prompt_index: int, generator_index: int) -> str:
    return f"{IMAGES_DIR}/p{prompt_index:06d}_g{generator_index:02d}.png"


def resolved_config(config: SynPicConfig) -> SynPicConfig:
    """``config`` with every path resolved (absolute, symlinks followed), so that a rerun naming the same files by
    other relative paths is the same run."""
    specs = tuple(dataclasses.replace(spec, model=spec.model.resolve(),
                                      lora=None if spec.lora is None else spec.lora.resolve())
                  for spec in config.generators)
    return dataclasses.replace(config, prompts=config.prompts.resolve(), output_dir=config.output_dir.resolve(),
                               generators=specs, rewards=tuple((path.resolve(), kind) for path, kind in config.rewards))


def _resolve_paths(options: dict) -> dict:
    """The pixel options of a ``synpic_config.json`` with its paths resolved (files of earlier versions hold them as
    typed; relative ones are taken from the current folder)."""
    def resolve(value):
        return str(Path(value).resolve()) if isinstance(value, str) else value

    options = dict(options)
    if "prompts" in options:
        options["prompts"] = resolve(options["prompts"])
    if isinstance(options.get("generators"), list):
        options["generators"] = [
            {**spec, "model": resolve(spec.get("model")), "lora": resolve(spec.get("lora"))}
            if isinstance(spec, dict) else spec for spec in options["generators"]]
    return options


def _pixel_options(config: SynPicConfig) -> dict:
    options = config_to_dict(resolved_config(config))
    return {key: value for key, value in options.items() if key not in NON_PIXEL_OPTIONS}


def _describe_changes(previous: dict, current: dict) -> str:
    changed = sorted(key for key in set(previous) | set(current) if previous.get(key) != current.get(key))
    parts = []
    for key in changed:
        if key == "generators":
            parts.append("generators (models, LoRAs, schedulers or seeds)")
        else:
            parts.append(f"{key}: {previous.get(key)!r} -> {current.get(key)!r}")
    text = "; ".join(parts)
    if "batch_size" in changed:
        text += (f". The batch size changes a few pixels by one level (float rounding in batched sampling), so one "
                 f"dataset is drawn with one batch size: rerun with --batch-size {previous.get('batch_size')}")
    return text


def prepare_output(config: SynPicConfig) -> None:
    """Create the output folder (check it is writable) and its config file; refuse a folder made with options that
    change pixels, unless --overwrite (which deletes its images and index)."""
    folder = config.output_dir
    check_writable_folder(folder)
    existing = folder / CONFIG_FILE
    current = _pixel_options(config)
    if existing.is_file():
        try:
            previous = _resolve_paths({key: value for key, value in json.loads(existing.read_text(encoding="utf-8"))
                                       .items() if key not in NON_PIXEL_OPTIONS and key != "reward_names"})
        except (ValueError, AttributeError):
            previous = {}
        if previous != current:
            if not config.overwrite:
                raise SynPicError(f"'{folder}' holds a Syn-Pic run made with other options "
                                  f"({_describe_changes(previous, current)}). Continue it with the same options, "
                                  f"choose another --output-dir, or pass --overwrite to start over (deletes its "
                                  f"images).")
            shutil.rmtree(folder / IMAGES_DIR, ignore_errors=True)
            (folder / INDEX_FILE).unlink(missing_ok=True)
    (folder / IMAGES_DIR).mkdir(exist_ok=True)


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
                    save_png(picture, path)
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
    atomic_write_json(config.output_dir / CONFIG_FILE,
                      {**config_to_dict(resolved_config(config)), "reward_names": names})
    total = len(prompts) * len(config.generators)
    phase = "drawing"
    try:
        drawn = generate_pictures(config, prompts)
        logger.info("Drew %d picture(s); %d prompt(s) x %d generator(s) in all.", drawn, len(prompts),
                    len(config.generators))
        phase = "scoring"
        scores = score_pictures(config, prompts, reward_models)
        index = write_index(config, prompts, scores)
    except KeyboardInterrupt as error:
        saved = sum((config.output_dir / image_name(prompt, generator)).is_file()
                    for prompt in range(len(prompts)) for generator in range(len(config.generators)))
        raise SynPicInterrupted(phase, saved, total, config.output_dir) from error
    logger.info("Wrote %s", index)
    return index


def interrupt_message(arguments: Sequence[str], interrupt: KeyboardInterrupt) -> str:
    """What ``refinery-synpic`` prints on Ctrl-C: what is saved and the command that continues."""
    command = " ".join([invoked_as(PROG, __spec__.name if __spec__ else __name__),
                        *(shlex.quote(str(argument)) for argument in arguments)])
    if not isinstance(interrupt, SynPicInterrupted):
        where = "interrupted before any picture was drawn"
    elif interrupt.phase == "scoring":
        where = (f"interrupted while scoring: all {interrupt.total} pictures are saved in "
                 f"{interrupt.folder / IMAGES_DIR}, {INDEX_FILE} is not written yet")
    else:
        where = (f"interrupted while drawing: {interrupt.saved} of {interrupt.total} pictures are saved in "
                 f"{interrupt.folder / IMAGES_DIR}")
    return f"{PROG}: {where}. The same command continues where it stopped:\n  {command}"


def run(input_args: list[str] | None = None) -> Path:
    """Parse ``input_args`` (default ``sys.argv[1:]``) and build the dataset: the console command as a Python call.
    Returns the path of ``index.jsonl``; bad flags exit with status 2 (argparse), other problems raise SynPicError
    (a SetupError), DatasetError (the prompts file) or LoraMismatchError; Ctrl-C raises :class:`SynPicInterrupted`."""
    return build_dataset(parse_args(input_args))


def main(input_args: list[str] | None = None) -> int:
    """Console entry point; returns the exit status. 0: index.jsonl is written; 1: an unusable prompts file,
    generator, reward or output folder (a message); 2: a bad flag; 130: Ctrl-C (the saved pictures are kept, and
    the command that continues is printed)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    arguments = list(sys.argv[1:] if input_args is None else input_args)
    try:
        index = run(arguments)
    except (SetupError, DatasetError, LoraMismatchError) as error:
        raise SystemExit(f"{PROG}: error: {error}") from error
    except KeyboardInterrupt as interrupt:
        print(interrupt_message(arguments, interrupt), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    print(f"Wrote {index}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
