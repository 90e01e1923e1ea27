"""peft LoRA on a diffusers UNet and transformers CLIP text encoders: add, switch off for the reference, checkpoint.

Adapters are added the way diffusers' own LoRA scripts do (``examples/text_to_image/train_text_to_image_lora.py``,
``examples/dreambooth/train_dreambooth_lora.py``): ``model.add_adapter(LoraConfig(r, lora_alpha,
init_lora_weights="gaussian", target_modules=...))`` on the frozen model, which injects peft ``LoraLayer``s in place
(no ``PeftModel`` wrapper, so module paths stay the diffusers/transformers ones the exporter names).
``core/lora_export.py`` writes the result for ComfyUI; :func:`add_lora` refuses targets it could not export, so a
run never ends with an unexportable LoRA.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence

import torch

from ...core.lora_export import (
    TEXT_ENCODER_MODULE_PATTERNS,
    UNET_MODULE_PATTERNS,
    unexportable_modules,
)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections, as diffusers' LoRA scripts
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")  # as train_dreambooth_lora.py
_LORA_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


def _check_settings(rank, alpha, dropout) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive finite number (ComfyUI scales by alpha / rank), got "
                         f"{alpha!r}. The usual choice is alpha = rank (scale 1).")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")


def add_lora(
    model: torch.nn.Module,
    *,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] | None = None,
    dropout: float = 0.0,
    component: str = "unet",
    adapter_name: str = "default",
    init_lora_weights: bool | str = "gaussian",
) -> list[str]:
    """Freeze ``model`` and add the peft LoRA ``adapter_name`` to ``target_modules``; only the LoRA trains.

    model: a diffusers ``UNet2DConditionModel`` (component "unet") or a transformers CLIP text model
        ("text_encoder", "text_encoder_2"); both have ``add_adapter``.
    rank: r >= 1. alpha: > 0, default ``rank`` (peft scale alpha / r = 1).
    target_modules: peft suffixes (default :data:`UNET_TARGET_MODULES` / :data:`TEXT_ENCODER_TARGET_MODULES`);
        every matched module must be a Linear or Conv2d that ``core/lora_export.py`` can write.
    dropout: LoRA dropout probability in [0, 1).
    init_lora_weights: peft's init ("gaussian" as diffusers' scripts; any peft init leaves B = 0, i.e. the
        adapter starts as the identity).

    Returns the adapted module paths, sorted. Raises ValueError (before touching the model) for bad settings, an
    unknown component, targets that match nothing, or targets the exporter cannot carry.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import check_target_module_exists

    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}.")
    alpha = rank if alpha is None else alpha
    _check_settings(rank, alpha, dropout)
    if target_modules is None:
        target_modules = UNET_TARGET_MODULES if component == "unet" else TEXT_ENCODER_TARGET_MODULES
    target_modules = list(target_modules)
    if not target_modules or not all(isinstance(name, str) and name for name in target_modules):
        raise ValueError(f"target_modules must be a non-empty list of module name suffixes, got {target_modules!r}.")
    if not hasattr(model, "add_adapter"):
        raise TypeError(f"{type(model).__name__} has no add_adapter: pass a diffusers model or a transformers "
                        f"PreTrainedModel.")

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        init_lora_weights=init_lora_weights)
    matched = sorted(name for name, module in model.named_modules()
                     if name and check_target_module_exists(config, name))
    if not matched:
        leaves = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, _LORA_TYPES)})
        raise ValueError(f"target_modules {target_modules} match no module of the {component}. Its Linear/Conv2d "
                         f"module names end in: {leaves[:40]}.")
    wrong_type = [name for name in matched if not isinstance(model.get_submodule(name), _LORA_TYPES)]
    if wrong_type:
        raise ValueError(f"target_modules {target_modules} match modules that are not Linear or Conv2d, e.g. "
                         f"{wrong_type[:3]}; LoRA is added to Linear and Conv2d layers only.")
    refused = unexportable_modules(matched, component)
    if refused:
        allowed = UNET_MODULE_PATTERNS if component == "unet" else TEXT_ENCODER_MODULE_PATTERNS
        raise ValueError(f"target_modules {target_modules} match {len(refused)} module(s) that the ComfyUI LoRA "
                         f"export cannot write, e.g. {refused[:3]}. Exportable module paths match: {allowed}.")

    model.requires_grad_(False)
    if component == "unet":
        model.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    return matched


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of ``model`` (what the optimiser gets)."""
    return [param for name, param in model.named_parameters() if param.requires_grad and "lora_" in name]


def _lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(*models: torch.nn.Module) -> Iterator[None]:
    """Run the base model: every peft adapter of ``models`` off inside the block, and back exactly as it was
    afterwards (per-layer enabled flag and each adapter parameter's ``requires_grad``), even when the block raises.

    The reference model of Diffusion-DPO / RankDPO / Focus-N-Fix is this: the same UNet with its LoRA disabled, so
    no second UNet is held in memory. Raises ValueError when a model has no adapter (a reference equal to the
    policy would silently zero the loss).
    """
    layers = []
    for model in models:
        found = _lora_layers(model)
        if not found:
            raise ValueError(f"{type(model).__name__} has no peft adapter to disable.")
        layers += found
    saved = [(layer, bool(layer.disable_adapters), [(param, param.requires_grad) for param in layer.parameters()])
             for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, was_disabled, grads in saved:
            layer.enable_adapters(not was_disabled)  # peft resets requires_grad here: restore it below
            for param, requires_grad in grads:
                param.requires_grad_(requires_grad)


def set_gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing on or off: diffusers models (``enable_gradient_checkpointing``) and
    transformers models (``activation_checkpointing_enable`` from transformers 5, ``gradient_checkpointing_enable``
    before; non-reentrant, so a frozen embedding's output needs no ``requires_grad``)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers ModelMixin
        if enabled:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
    elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_enable"):  # transformers 4
        if enabled:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_disable()
    else:
        raise TypeError(f"{type(model).__name__} supports no gradient checkpointing (not a diffusers or "
                        f"transformers model).")


class LoraMismatchError(ValueError):
    """A LoRA file that cannot go on this model (another base model, not a LoRA, not safetensors)."""


def check_lora_file(path, family: str) -> dict[str, str]:
    """Refuse, before any long work, a LoRA file that is not safetensors (e.g. a pickled ``.ckpt`` renamed) or
    whose Refinery metadata names another base family than ``family`` ("sd15" / "sdxl"):
    :class:`LoraMismatchError`. Returns the file's metadata."""
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise LoraMismatchError(f"The LoRA '{path}' is not a readable safetensors file ({error}); pickled .ckpt/.pt "
                                f"files are not loaded (they can run code): convert it to .safetensors.") from None
    trained_for = metadata.get("refinery.base_family")
    if trained_for and trained_for != family:
        raise LoraMismatchError(f"The LoRA '{path.name}' was trained for {trained_for}, but the model is {family}: "
                                f"use a LoRA trained on this base model.")
    return metadata


DIFFUSERS_LORA_LOGGER = "diffusers.loaders.lora_base"  # where load_lora_weights reports a component without keys
NO_KEYS_NOTICE = "No LoRA keys associated to"
TEXT_ENCODER_KEY_PREFIXES = ("lora_te", "text_encoder")  # kohya / ComfyUI, diffusers


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def dropped_log_records(logger_name: str, prefix: str):
    """Drop the records of logger ``logger_name`` whose message starts with ``prefix`` while the block runs (a filter
    on that one logger, removed afterwards: nothing else is silenced)."""
    log = logging.getLogger(logger_name)
    dropping = _DropRecords(prefix)
    log.addFilter(dropping)
    try:
        yield
    finally:
        log.removeFilter(dropping)


def _has_text_encoder_keys(path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return any(key.startswith(TEXT_ENCODER_KEY_PREFIXES) for key in handle.keys())


def load_lora_into_pipeline(pipeline, path, adapter_name: str) -> None:
    """``pipeline.load_lora_weights(path)`` with the failures users meet turned into one clear message
    (:class:`LoraMismatchError`): :func:`check_lora_file`'s, and a LoRA whose layers have other shapes than the
    model's or whose modules the model does not have (trained for another base model). Nothing stays loaded after
    a failure."""
    from pathlib import Path

    from .model_loading import pipeline_family

    path = Path(path)
    family = pipeline_family(pipeline)
    check_lora_file(path, family)
    quiet = contextlib.nullcontext()
    if not _has_text_encoder_keys(path):  # diffusers says so for every text encoder, as a warning: expected here
        quiet = dropped_log_records(DIFFUSERS_LORA_LOGGER, NO_KEYS_NOTICE)
    try:
        with quiet:
            pipeline.load_lora_weights(str(path), adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as error:
        pipeline.unload_lora_weights()
        text = str(error)
        mismatches = [line.strip() for line in text.splitlines() if "size mismatch" in line]
        if mismatches:
            detail = f"{len(mismatches)} layers have other shapes than the model's, e.g. {mismatches[0]}"
        elif "not found" in text or "NoMatching" in type(error).__name__:
            detail = "its layers are not in the model"
        else:
            detail = text.splitlines()[0][:300]
        raise LoraMismatchError(f"The LoRA '{path.name}' does not fit this {family} model: {detail}. It was probably "
                                f"trained for another base model; use a LoRA of this one.") from None
