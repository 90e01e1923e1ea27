"""Accelerator construction shared by the trainers: project folder, mixed precision, accumulation, seed, threads."""

from __future__ import annotations

import logging

import torch

from .config import TrainingConfig

logger = logging.getLogger(__name__)


def make_accelerator(training: TrainingConfig):
    """An ``accelerate.Accelerator`` for ``training``: ``ProjectConfiguration`` rooted at the output folder (our own
    checkpoint naming, see ``checkpoint.py``), gradient accumulation, mixed precision; torch threads limited when
    ``training.threads`` is set; ``set_seed(training.seed)`` (Python, NumPy and torch RNGs on every process)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    if training.threads is not None:
        torch.set_num_threads(training.threads)
    project = ProjectConfiguration(
        project_dir=str(training.output_dir),
        logging_dir=str(training.output_dir / "logs"),
        automatic_checkpoint_naming=False,
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        mixed_precision=training.mixed_precision,
        project_config=project,
    )
    set_seed(training.seed)
    effective = training.train_batch_size * accelerator.num_processes * training.gradient_accumulation_steps
    logger.info(
        "Effective batch size %d = %d per device x %d processes x %d accumulation steps; %d optimiser steps",
        effective, training.train_batch_size, accelerator.num_processes, training.gradient_accumulation_steps,
        training.max_train_steps,
    )
    return accelerator


def seed_for_step(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed derived from (seed, step, stream), for per-step draws that do not depend on what ran before
    (so a resumed run draws exactly what an uninterrupted one would)."""
    value = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & ((1 << 64) - 1)
    value ^= value >> 31
    return value & ((1 << 63) - 1)
