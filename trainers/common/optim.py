"""AdamW with decoupled weight decay on weight matrices only, and the warm-up learning-rate schedules."""

from __future__ import annotations

import torch

from .config import TrainingConfig

NO_DECAY_NAMES = ("logit_scale", "bias", "ln_", "norm", "embedding", "class_embedding")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups of the *trainable* parameters: weight matrices (ndim >= 2, decayed by ``weight_decay``) and
    the rest (biases, norms, embeddings, the logit scale: no decay, as in open_clip's and CLIP's training)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or any(part in name for part in NO_DECAY_NAMES):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, training: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` with the options of ``training``."""
    groups = parameter_groups(model, training.weight_decay)
    if not any(group["params"] for group in groups):
        raise ValueError("The model has no trainable parameter: check the layer-freezing options.")
    return torch.optim.AdamW(
        groups,
        lr=training.learning_rate,
        betas=(training.adam_beta1, training.adam_beta2),
        eps=training.adam_epsilon,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, training: TrainingConfig, num_processes: int = 1):
    """Linear warm-up then cosine decay to 0 (or constant) over ``training.max_train_steps``, from diffusers.

    The step counts are multiplied by ``num_processes`` because accelerate's prepared scheduler steps once per
    process per optimiser step (as in the diffusers training scripts).
    """
    from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup = training.lr_warmup_steps * num_processes
    if training.lr_scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, training.max_train_steps * num_processes)
    if training.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    raise ValueError(f"Unknown learning-rate schedule {training.lr_scheduler!r}; expected 'cosine' or 'constant'.")
