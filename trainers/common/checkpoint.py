"""Resumable checkpoints: ``<output_dir>/checkpoints/step-<n>/`` written atomically, a ``latest`` pointer written
last, rotation to the newest K, exact resume.

A checkpoint folder holds accelerate's state (optimizer, scheduler, every process's Python / NumPy / torch RNG
states, the gradient-scaler when mixed precision uses one), the *trained* parameters only
(``trainable.safetensors``: frozen layers are the base checkpoint's and never change), and ``trainer_state.json``
with the step and the run's config. The step is read from that file, never parsed from the folder name.

Writing order: everything goes into ``checkpoints/.step-<n>.tmp/``, which is renamed to ``step-<n>`` when complete;
then ``latest`` (a one-line text file naming the folder) is replaced atomically; then old folders are rotated out.
A crash at any point leaves ``latest`` naming a complete checkpoint (or no ``latest`` at all).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_json, atomic_write_text, publish_directory

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
AUTO = "auto"  # --resume-from auto: the latest checkpoint when there is one, else a fresh start
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FORMAT = "refinery-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, incomplete, or from another setup."""


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint folder; CheckpointError when there is none or it is unreadable."""
    path = Path(checkpoint) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise CheckpointError(
            f"'{checkpoint}' is not a complete checkpoint: it has no {STATE_FILE} (a checkpoint folder is "
            f"<output-dir>/{CHECKPOINTS_DIR}/step-<n>)."
        ) from error
    except (OSError, ValueError) as error:
        raise CheckpointError(f"'{path}' is not readable JSON: {error}") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("step"), int):
        raise CheckpointError(f"'{path}' is not a {STATE_FORMAT} trainer state (it needs 'format' and 'step').")
    return state


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``<output_dir>/checkpoints`` as (step, folder), oldest first."""
    found = []
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return found
    for child in folder.iterdir():
        if child.is_dir() and not child.name.startswith(".") and (child / STATE_FILE).is_file():
            try:
                found.append((read_trainer_state(child)["step"], child))
            except CheckpointError:
                logger.warning("Ignoring '%s': its %s is unreadable.", child, STATE_FILE)
    return sorted(found)


def resolve_checkpoint(output_dir: str | Path, resume_from: str) -> Path:
    """The checkpoint folder that ``--resume-from`` names: ``latest`` (the folder ``<output_dir>/checkpoints/latest``
    names) or a path to a checkpoint folder. CheckpointError, saying what to do, when it does not exist."""
    if resume_from == LATEST:
        pointer = checkpoints_dir(output_dir) / LATEST
        if not pointer.is_file():
            raise CheckpointError(
                f"--resume-from latest: there is no checkpoint pointer '{pointer}', so no run saved a checkpoint into "
                f"'{output_dir}' yet. Start without --resume-from, name a checkpoint folder, or use --resume-from "
                f"auto (resumes when there is a checkpoint, else starts fresh)."
            )
        folder = pointer.parent / pointer.read_text(encoding="utf-8").strip()
        if not folder.is_dir():
            raise CheckpointError(f"'{pointer}' names '{folder.name}', which does not exist in '{pointer.parent}'.")
    else:
        folder = Path(resume_from)
        if not folder.is_dir():
            raise CheckpointError(
                f"--resume-from '{resume_from}' is not a folder. Give 'latest', 'auto' or a checkpoint folder such as "
                f"'{checkpoints_dir(output_dir) / 'step-500'}'."
            )
    read_trainer_state(folder)  # complete?
    return folder


def register_trainable_state_hooks(accelerator, model: torch.nn.Module, names: list[str],
                                   file_name: str = TRAINABLE_FILE) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` store only the parameters ``names`` of ``model`` (the
    trained ones) in ``file_name`` (default ``trainable.safetensors``; give each prepared model its own name),
    instead of the whole model."""
    from safetensors.torch import load_file, save_file

    wanted = list(names)

    def owned(models) -> int | None:
        for index, candidate in enumerate(models):
            if accelerator.unwrap_model(candidate) is model:
                return index
        return None

    def save_hook(models, weights, output_dir):
        index = owned(models)
        if index is None:
            return
        if accelerator.is_main_process:
            parameters = dict(model.named_parameters())
            save_file({name: parameters[name].detach().cpu().contiguous() for name in wanted},
                      str(Path(output_dir) / file_name))
        weights.pop(index)

    def load_hook(models, input_dir):
        index = owned(models)
        if index is None:
            return
        models.pop(index)
        path = Path(input_dir) / file_name
        if not path.is_file():
            raise CheckpointError(f"Checkpoint '{input_dir}' has no {file_name}: it was saved by a run that trained "
                                  f"other parts of the model; resume with the options it was started with.")
        tensors = load_file(str(path))
        if sorted(tensors) != sorted(wanted):
            missing = sorted(set(wanted) - set(tensors))
            extra = sorted(set(tensors) - set(wanted))
            raise CheckpointError(
                f"Checkpoint '{input_dir}' trained other parameters than this run trains ({len(missing)} missing, e.g. "
                f"{missing[:3]}; {len(extra)} extra, e.g. {extra[:3]}): use the same layer-freezing options."
            )
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name in wanted:
                parameters[name].copy_(tensors[name])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def resume_point(output_dir: str | Path, resume_from: str | None, max_train_steps: int) -> tuple[Path | None, dict]:
    """Where a run starts: ``(checkpoint folder, its trainer state)`` that ``--resume-from`` names, or ``(None, {})``
    for a fresh start. ``auto``: the checkpoint ``latest`` names (or, when a crash came between a first checkpoint
    and its pointer, the newest complete one), else a fresh start. CheckpointError, saying what to do, for a fresh
    start into a folder that holds another run's checkpoints (they would be mixed and rotated away), and for a
    checkpoint past ``max_train_steps``."""
    if resume_from == AUTO:
        if (checkpoints_dir(output_dir) / LATEST).is_file():
            resume_from = LATEST
        else:
            found = list_checkpoints(output_dir)
            if not found:
                logger.info("--resume-from auto: no checkpoint in '%s', starting fresh.", checkpoints_dir(output_dir))
                return None, {}
            resume_from = str(found[-1][1])
        logger.info("--resume-from auto: resuming from %s", resume_from)
    if resume_from:
        folder = resolve_checkpoint(output_dir, resume_from)
        state = read_trainer_state(folder)
        if state["step"] > max_train_steps:
            raise CheckpointError(f"Checkpoint '{folder}' is at step {state['step']}, past --max-train-steps "
                                  f"{max_train_steps}.")
        return folder, state
    if list_checkpoints(output_dir) or (checkpoints_dir(output_dir) / LATEST).exists():
        raise CheckpointError(
            f"'{output_dir}' already holds checkpoints of an earlier run. Continue it with --resume-from latest (or "
            f"--resume-from auto, which also starts fresh where there is none), or choose another --output-dir."
        )
    return None, {}


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict[str, Any],
                    total_limit: int | None = None) -> Path:
    """Save a resumable checkpoint for optimiser step ``step`` (all processes call this). ``state``: extra JSON
    (e.g. the config) stored in ``trainer_state.json`` beside the step. Returns ``checkpoints/step-<step>``."""
    folder = checkpoints_dir(output_dir)
    final = folder / f"step-{step}"
    temporary = folder / f".step-{step}.tmp"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(temporary / STATE_FILE, {"format": STATE_FORMAT, "step": step, **state})
        publish_directory(temporary, final)
        atomic_write_text(folder / LATEST, final.name + "\n")
        if total_limit:
            rotate_checkpoints(output_dir, total_limit)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: str | Path) -> dict[str, Any]:
    """Restore model (trained parameters), optimizer, scheduler and RNG states from ``checkpoint``; returns its
    trainer state (with ``step``)."""
    state = read_trainer_state(checkpoint)
    accelerator.load_state(str(checkpoint))
    logger.info("Resumed from %s at step %d", checkpoint, state["step"])
    return state


def rotate_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (by their stored step), never the one ``latest``
    names. Returns the deleted folders."""
    found = list_checkpoints(output_dir)
    pointer = checkpoints_dir(output_dir) / LATEST
    current = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    deleted = []
    for _, path in found[: max(0, len(found) - keep)]:
        if path.name == current:
            continue
        shutil.rmtree(path)
        deleted.append(path)
    return deleted
