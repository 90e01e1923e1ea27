"""Shared training options: frozen, typed dataclasses, their command-line flags, checks, and JSON form.

Each trainer's own config (``trainers/<method>/config.py``) holds a :class:`TrainingConfig` in its ``training``
field; :func:`add_training_arguments` registers the flags, :func:`training_config_from_args` builds and checks it
right after parsing (errors go through ``parser.error``: exit status 2 and the usage line). The LoRA trainers'
configs extend :class:`LoraTrainingOptions` (flags: :func:`add_lora_arguments`; checked and built by
:func:`lora_config_from_args`). :func:`config_from_args` builds any config dataclass from parsed flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ...core.lora_export import FAMILIES
from .atomic import atomic_write_json
from .lora import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES

FAMILY_CHOICES = ("auto", *FAMILIES)  # --family: "auto" reads the family from the weights
LR_SCHEDULERS = ("cosine", "constant")
MIXED_PRECISION = ("no", "fp16", "bf16")
CONFIG_FILE = "training_config.json"


class SetupError(ValueError):
    """The run cannot start (model, options, output folder); the message says what to change."""


def refuse_existing_output(output: Path, overwrite: bool) -> None:
    """SetupError when the trained file ``output`` already exists and --overwrite was not given (every trainer checks
    this before any long work)."""
    if output.exists() and not overwrite:
        raise SetupError(f"'{output}' already exists. Pass --overwrite to replace it, or choose another "
                         f"--output-name / --output-dir.")


def check_writable_folder(folder: Path, flag: str = "--output-dir") -> None:
    """Create ``folder`` and write (and delete) a test file in it; SetupError naming ``flag`` when that fails (a file
    in the way, no permission, a full disk), before any long work."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise SetupError(f"Cannot write into {flag} '{folder}' ({error.strerror or error}). Choose a writable folder "
                         f"with free space.") from error


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Options every trainer shares. Steps count optimiser updates (after gradient accumulation).

    lr_warmup_steps is resolved at parse time (the flag's default is 5 % of max_train_steps, the paper's
    1,500 of 30,000), so the stored config shows the schedule actually used.
    """

    output_dir: Path
    seed: int = 0
    max_train_steps: int = 1000
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-6
    weight_decay: float = 0.2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 50
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 3
    resume_from: str | None = None
    mixed_precision: str = "no"
    threads: int | None = None
    dataloader_num_workers: int = 0
    log_every: int = 10


DEFAULT_WARMUP_FRACTION = 0.05


def add_training_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """Register the :class:`TrainingConfig` flags on ``parser``; ``defaults`` overrides field defaults by name."""
    base = {field.name: field.default for field in dataclasses.fields(TrainingConfig)} | defaults
    group = parser.add_argument_group("training")
    group.add_argument("--output-dir", type=Path, required="output_dir" not in defaults, default=defaults.get("output_dir"),
                       help="folder for checkpoints/, the config and the final model")
    group.add_argument("--seed", type=int, default=base["seed"], help="one seed for initialisation, data order and "
                       "augmentation (per-step draws are derived from (seed, step))")
    group.add_argument("--max-train-steps", type=int, default=base["max_train_steps"], help="optimiser steps")
    group.add_argument("--train-batch-size", type=int, default=base["train_batch_size"],
                       help="pairs per device per micro-batch")
    group.add_argument("--gradient-accumulation-steps", type=int, default=base["gradient_accumulation_steps"])
    group.add_argument("--learning-rate", type=float, default=base["learning_rate"], help="peak AdamW learning rate")
    group.add_argument("--weight-decay", type=float, default=base["weight_decay"],
                       help="AdamW decoupled weight decay on weight matrices (not on biases, norms, embeddings, "
                       "logit scale)")
    group.add_argument("--adam-beta1", type=float, default=base["adam_beta1"])
    group.add_argument("--adam-beta2", type=float, default=base["adam_beta2"])
    group.add_argument("--adam-epsilon", type=float, default=base["adam_epsilon"])
    group.add_argument("--max-grad-norm", type=float, default=base["max_grad_norm"],
                       help="gradient clipping norm; 0 turns clipping off")
    group.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default=base["lr_scheduler"],
                       help="cosine decay to 0 after the warm-up, or constant after it")
    group.add_argument("--lr-warmup-steps", type=int, default=None,
                       help=f"linear warm-up steps (default {DEFAULT_WARMUP_FRACTION:.0%}% of --max-train-steps)")
    group.add_argument("--checkpointing-steps", type=int, default=base["checkpointing_steps"],
                       help="save a resumable checkpoint into <output-dir>/checkpoints/step-<n> every N steps")
    group.add_argument("--checkpoints-total-limit", type=int, default=base["checkpoints_total_limit"],
                       help="keep only the newest K checkpoints (0: keep all)")
    group.add_argument("--resume-from", default=base["resume_from"],
                       help="'latest' (the checkpoint <output-dir>/checkpoints/latest names; refused when there is "
                       "none), 'auto' (resume from the latest checkpoint when there is one, else start fresh: the "
                       "spelling for scripts) or a checkpoint folder")
    group.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=base["mixed_precision"])
    group.add_argument("--threads", type=int, default=base["threads"], help="torch CPU threads (default: torch's)")
    group.add_argument("--dataloader-num-workers", type=int, default=base["dataloader_num_workers"])
    group.add_argument("--log-every", type=int, default=base["log_every"], help="log the losses every N steps")


def training_config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainingConfig:
    """Build and check the :class:`TrainingConfig` from parsed ``args``; ``parser.error`` on a bad value."""
    positive = ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                "log_every")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.learning_rate <= 0:
        parser.error(f"--learning-rate must be positive, got {args.learning_rate}.")
    for name in ("weight_decay", "max_grad_norm", "adam_epsilon"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}.")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}.")
    warmup = args.lr_warmup_steps
    if warmup is None:
        warmup = int(round(DEFAULT_WARMUP_FRACTION * args.max_train_steps))
    if not 0 <= warmup <= args.max_train_steps:
        parser.error(f"--lr-warmup-steps must be in [0, --max-train-steps = {args.max_train_steps}], got {warmup}.")
    limit = args.checkpoints_total_limit
    if limit is not None and limit < 0:
        parser.error(f"--checkpoints-total-limit must be 0 (keep all) or positive, got {limit}.")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}.")
    if args.dataloader_num_workers < 0:
        parser.error(f"--dataloader-num-workers must not be negative, got {args.dataloader_num_workers}.")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output-dir '{args.output_dir}' exists and is not a folder.")
    return config_from_args(TrainingConfig, args, lr_warmup_steps=warmup,
                            checkpoints_total_limit=None if not limit else limit)


def config_from_args(config_class: type, args: argparse.Namespace, **values: Any) -> Any:
    """``config_class(**values)`` (a config dataclass), every other init field taken from the parsed argument of the
    same name (a list as a tuple); fields without such an argument keep their defaults."""
    for field in dataclasses.fields(config_class):
        if field.init and field.name not in values and hasattr(args, field.name):
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return config_class(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A (nested) config dataclass as a JSON-ready dict: paths as strings, tuples as lists."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {field.name: plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [plain(item) for item in value]
        return value

    return plain(config)


def write_config(config: Any, output_dir: str | Path) -> Path:
    """Write ``<output_dir>/training_config.json`` (a config dataclass or its :func:`config_to_dict` form)
    atomically. Returns its path."""
    return atomic_write_json(Path(output_dir) / CONFIG_FILE, config_to_dict(config))


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two :func:`config_to_dict` results."""
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return names


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraTrainingOptions:
    """What every LoRA trainer (RankDPO, Focus-N-Fix) shares, i.e. what ``sd_models.load_models`` and
    ``check_output`` read; each trainer's config extends it (keyword-only fields).

    model: the base model, a diffusers folder or a single-file SD1.5/SDXL ``.safetensors``; family: "auto" or the
    family it must be (:data:`FAMILY_CHOICES`). resolution: side in pixels (None: the model's native size). rank
    >= 1, lora_alpha > 0 (None: the rank, i.e. scale 1), lora_dropout in [0, 1), target_modules: UNet module name
    suffixes with a LoRA; train_text_encoder with text_encoder_target_modules. gradient_checkpointing: recompute
    activations in the backward pass. output_name: the LoRA's file name (no extension) in ``training.output_dir``;
    overwrite: replace an existing one.
    """

    model: Path
    family: str = "auto"
    resolution: int | None = None
    rank: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = UNET_TARGET_MODULES
    train_text_encoder: bool = False
    text_encoder_target_modules: tuple[str, ...] = TEXT_ENCODER_TARGET_MODULES
    gradient_checkpointing: bool = False
    output_name: str = "lora"
    overwrite: bool = False


def add_lora_arguments(parser: argparse.ArgumentParser, model_group: argparse._ArgumentGroup, *,
                       resolution_help: str, output_name: str, gradient_checkpointing: bool, checkpointing_help: str,
                       text_encoder_help: str = "also train a LoRA on the text encoder(s)",
                       rank_help: str = "LoRA rank r >= 1") -> None:
    """The flags of :class:`LoraTrainingOptions`: ``--model``, ``--family``, ``--resolution`` (on ``model_group``),
    then groups with ``--rank``, ``--lora-alpha``, ``--lora-dropout``, target modules, ``--train-text-encoder``,
    ``--gradient-checkpointing``, ``--output-name``, ``--overwrite``; checked by :func:`lora_config_from_args`.
    resolution_help: what the side is ("training side in pixels"); gradient_checkpointing: the default (True: a
    ``--no-...`` flag turns it off)."""
    model_group.add_argument("--model", type=Path, required=True,
                             help="base model: a diffusers folder, or a single-file SD1.5/SDXL .safetensors "
                             "(ComfyUI's models/checkpoints/)")
    model_group.add_argument("--family", choices=FAMILY_CHOICES, default="auto",
                             help="the model family it must be (auto: read it from the weights)")
    model_group.add_argument("--resolution", type=int, default=None,
                             help=f"{resolution_help} (default: the model's native size); a multiple of 8")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=8, help=rank_help)
    lora.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout in [0, 1)")
    lora.add_argument("--target-modules", nargs="+", default=list(UNET_TARGET_MODULES),
                      help="UNet module name suffixes that get a LoRA")
    lora.add_argument("--train-text-encoder", action="store_true", help=text_encoder_help)
    lora.add_argument("--text-encoder-target-modules", nargs="+", default=list(TEXT_ENCODER_TARGET_MODULES))
    if gradient_checkpointing:
        lora.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                          help=checkpointing_help)
    else:
        lora.add_argument("--gradient-checkpointing", action="store_true", help=checkpointing_help)
    output = parser.add_argument_group("output")
    output.add_argument("--output-name", default=output_name,
                        help="file name (no extension) of the LoRA in --output-dir")
    output.add_argument("--overwrite", action="store_true", help="replace an existing <output-name>.safetensors")


def lora_config_from_args(config_class: type, args: argparse.Namespace, parser: argparse.ArgumentParser,
                          **values: Any) -> Any:
    """A LoRA trainer's config (a :class:`LoraTrainingOptions` subclass) from parsed ``args``: the training flags
    (:func:`training_config_from_args`) and :func:`add_lora_arguments`' flags checked (``parser.error`` on a bad
    value, a ``--model`` that does not exist included), then :func:`config_from_args` with ``values``."""
    import os

    training = training_config_from_args(args, parser)
    if not args.model.exists():
        parser.error(f"--model '{args.model}' does not exist: pass a diffusers folder or a single-file checkpoint.")
    if args.rank < 1:
        parser.error(f"--rank must be a positive integer, got {args.rank}.")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        parser.error(f"--lora-alpha must be positive, got {args.lora_alpha}.")
    if not 0 <= args.lora_dropout < 1:
        parser.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}.")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        parser.error(f"--resolution must be a positive multiple of 8, got {args.resolution}.")
    name = args.output_name
    if not name or os.sep in name or "/" in name or name.startswith(".") or name.endswith(".safetensors"):
        parser.error(f"--output-name must be a plain file name without folders or extension, got {name!r}.")
    return config_from_args(config_class, args, training=training, **values)
