"""Configuration of ``refinery-synpic``: the generator specs and one frozen dataclass, built and checked by
:func:`parse_args`."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "DPMSolverMultistepScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler",
              "UniPCMultistepScheduler")
DTYPES = ("auto", "float32", "float16", "bfloat16")
CONFIG_FILE = "synpic_config.json"
GENERATOR_KEYS = ("name", "model", "lora", "lora_scale", "scheduler", "seed", "guidance_scale", "steps")


@dataclass(frozen=True)
class GeneratorSpec:
    """One of the k generators: a model (diffusers folder or single-file SD1.5/SDXL checkpoint), optionally a LoRA
    fused at ``lora_scale`` and another scheduler; ``seed`` offsets its noise (generators that differ only in
    ``seed`` are "k seeds of one model"); ``guidance_scale`` / ``steps`` override the run's (None: the run's)."""

    name: str
    model: Path
    lora: Path | None = None
    lora_scale: float = 1.0
    scheduler: str | None = None
    seed: int = 0
    guidance_scale: float | None = None
    steps: int | None = None

    def loading_key(self) -> tuple:
        """Generators with equal keys share one loaded pipeline."""
        return (str(self.model), str(self.lora), self.lora_scale, self.scheduler)


@dataclass(frozen=True)
class SynPicConfig:
    """One run. prompts: .txt (one per line; blank and '#' lines skipped) or .jsonl ({"prompt": ...} per line).
    rewards: (path, kind) pairs for ``core/rewards/loading.load_reward_model``. steps / guidance_scale: sampling
    defaults; height / width: None = the model's native size; batch_size: prompts per pipeline call."""

    prompts: Path
    generators: tuple[GeneratorSpec, ...]
    rewards: tuple[tuple[Path, str], ...]
    output_dir: Path
    steps: int = 30
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""
    batch_size: int = 4
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"
    threads: int | None = None
    overwrite: bool = False
    reward_batch_size: int = field(default=16)


def read_generators_file(path: Path, default_model: Path | None) -> tuple[GeneratorSpec, ...]:
    """``--generators FILE.json``: a list of objects with the keys of :data:`GENERATOR_KEYS`; ValueError naming the
    entry and key that is wrong."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"--generators '{path}' is not a readable JSON file: {error}") from error
    if not isinstance(entries, list):
        raise ValueError(f"--generators '{path}' must hold a JSON list of generator objects.")
    specs = []
    for index, entry in enumerate(entries):
        where = f"--generators '{path}' entry {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object, got {type(entry).__name__}.")
        unknown = sorted(set(entry) - set(GENERATOR_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}; allowed: {list(GENERATOR_KEYS)}.")
        model = entry.get("model", default_model)
        if model is None:
            raise ValueError(f"{where} names no 'model' and no --model was given.")
        try:
            spec = GeneratorSpec(
                name=str(entry.get("name", f"generator-{index}")), model=Path(model),
                lora=Path(entry["lora"]) if entry.get("lora") else None, lora_scale=float(entry.get("lora_scale", 1.0)),
                scheduler=entry.get("scheduler"), seed=int(entry.get("seed", index)),
                guidance_scale=None if entry.get("guidance_scale") is None else float(entry["guidance_scale"]),
                steps=None if entry.get("steps") is None else int(entry["steps"]))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from error
        specs.append(spec)
    return tuple(specs)


def check_generators(specs: tuple[GeneratorSpec, ...]) -> None:
    """ValueError for fewer than 2 generators, duplicate names, missing files, unknown schedulers, bad numbers."""
    if len(specs) < 2:
        raise ValueError(f"Syn-Pic ranks k >= 2 images per prompt, but {len(specs)} generator(s) were given: pass "
                         f"--seeds K with K >= 2, or at least two entries in --generators.")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"Generator names must be distinct, got {names}.")
    for spec in specs:
        if not spec.model.exists():
            raise ValueError(f"Generator '{spec.name}': model '{spec.model}' does not exist.")
        if spec.lora is not None and not spec.lora.is_file():
            raise ValueError(f"Generator '{spec.name}': LoRA '{spec.lora}' does not exist.")
        if spec.scheduler is not None and spec.scheduler not in SCHEDULERS:
            raise ValueError(f"Generator '{spec.name}': unknown scheduler {spec.scheduler!r}; choose one of "
                             f"{list(SCHEDULERS)}.")
        if spec.steps is not None and spec.steps < 1:
            raise ValueError(f"Generator '{spec.name}': steps must be at least 1, got {spec.steps}.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refinery-synpic",
        description="Build a Syn-Pic ranked preference dataset (rankdpo.txt sec. 3.2): every prompt drawn by k "
        "generators, every picture scored by n reward models, Syn-Pic win rates phi; writes images/, index.jsonl "
        "(what refinery-train-rankdpo reads) and synpic_config.json into --output-dir. Resumable: run the same "
        "command again to continue.",
    )
    data = parser.add_argument_group("prompts and generators")
    data.add_argument("--prompts", type=Path, required=True,
                      help="a .txt file (one prompt per line; blank and '#' lines skipped) or a .jsonl with a "
                      '"prompt" per line')
    data.add_argument("--model", type=Path, help="base model: diffusers folder or single-file SD1.5/SDXL checkpoint")
    data.add_argument("--seeds", type=int, help="k generators = K seeds of --model")
    data.add_argument("--generators", type=Path,
                      help='JSON list of generators: {"name", "model", "lora", "lora_scale", "scheduler", "seed", '
                      '"guidance_scale", "steps"} (model defaults to --model)')
    scoring = parser.add_argument_group("rewards")
    scoring.add_argument("--reward", type=Path, action="append", default=[], required=True,
                         help="a reward model file or folder (repeat for n rewards); see the scoring nodes' formats")
    scoring.add_argument("--reward-kind", action="append", default=[],
                         help="kind of each --reward, in order (default auto): clip-score, hpsv2, pickscore, "
                         "aesthetic, trained")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, default=30)
    sampling.add_argument("--guidance-scale", type=float, default=7.5)
    sampling.add_argument("--height", type=int, default=None, help="default: the model's native size")
    sampling.add_argument("--width", type=int, default=None, help="default: the model's native size")
    sampling.add_argument("--negative-prompt", default="")
    sampling.add_argument("--batch-size", type=int, default=4,
                          help="prompts per pipeline call (it moves a few pixels by one level, so a rerun into the "
                          "same --output-dir keeps it)")
    sampling.add_argument("--seed", type=int, default=0, help="base seed; picture (prompt i, generator g) uses a "
                          "seed derived from (seed, g's seed, i) only")
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", type=Path, required=True)
    run.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float16 on CUDA, float32 elsewhere")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run.add_argument("--overwrite", action="store_true",
                     help="start over in an --output-dir made with other options (deletes its images)")
    return parser


def parse_args(input_args: list[str] | None = None) -> SynPicConfig:
    """Parse and check ``input_args``; a bad value exits with status 2 and a message naming the flag."""
    parser = build_parser()
    args = parser.parse_args(input_args)
    if not args.prompts.is_file():
        parser.error(f"--prompts '{args.prompts}' does not exist.")
    if (args.seeds is None) == (args.generators is None):
        parser.error("give exactly one of --seeds K (K seeds of --model) or --generators FILE.json.")
    try:
        if args.seeds is not None:
            if args.model is None:
                parser.error("--seeds needs --model.")
            specs = tuple(GeneratorSpec(name=f"seed-{index}", model=args.model, seed=index)
                          for index in range(args.seeds))
        else:
            specs = read_generators_file(args.generators, args.model)
        check_generators(specs)
    except ValueError as error:
        parser.error(str(error))
    if args.reward_kind and len(args.reward_kind) != len(args.reward):
        parser.error(f"--reward-kind was given {len(args.reward_kind)} time(s) for {len(args.reward)} --reward(s): "
                     f"give one per reward, or none (auto).")
    for path in args.reward:
        if not path.exists():
            parser.error(f"--reward '{path}' does not exist.")
    for flag in ("steps", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}.")
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and (value < 8 or value % 8):
            parser.error(f"--{flag} must be a positive multiple of 8, got {value}.")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}.")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output-dir '{args.output_dir}' exists and is not a folder.")
    kinds = args.reward_kind or ["auto"] * len(args.reward)
    return SynPicConfig(
        prompts=args.prompts, generators=specs, rewards=tuple(zip(args.reward, kinds)), output_dir=args.output_dir,
        steps=args.steps, guidance_scale=args.guidance_scale, height=args.height, width=args.width,
        negative_prompt=args.negative_prompt, batch_size=args.batch_size, seed=args.seed, device=args.device,
        dtype=args.dtype, threads=args.threads, overwrite=args.overwrite)
