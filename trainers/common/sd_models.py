"""The Stable Diffusion side every LoRA trainer shares (RankDPO, Focus-N-Fix): load the user's SD1.5 / SDXL model
offline, freeze it, add the LoRA(s) (``lora.py``), encode prompts as diffusers' training scripts do, and check the
output file before any long work.

A trainer's config only needs the fields :func:`load_models` and :func:`check_output` read: those of
``config.LoraTrainingOptions`` (which the LoRA trainers' configs extend) and ``training.output_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import SetupError, check_writable_folder, refuse_existing_output
from .lora import add_lora, set_gradient_checkpointing
from .loop import Optimization
from .model_loading import UnsupportedModelError, detect_family, load_sd_pipeline, pipeline_family

__all__ = ["SetupError", "TrainingModels", "load_models", "encode_prompts", "expand_conditioning", "output_path",
           "check_output", "PreparedTraining", "prepare_lora_training", "export_trained_lora"]


# ------------------------------------------------------------------------------------------------ models
@dataclass
class TrainingModels:
    """The pieces one step needs. ``unet`` / ``text_encoders`` are what the optimiser trains through (possibly
    accelerate-wrapped); ``base_unet`` / ``base_text_encoders`` the plain modules (for the reference and export)."""

    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    tokenizers: list
    text_encoders: list[torch.nn.Module]
    noise_scheduler: object
    resolution: int
    trains_text_encoder: bool
    base_unet: torch.nn.Module | None = None
    base_text_encoders: list[torch.nn.Module] | None = None
    sampling_scheduler_config: dict = field(default_factory=dict)
    force_zeros_for_empty_prompt: bool = False

    def __post_init__(self):
        if self.base_unet is None:
            self.base_unet = self.unet
        if self.base_text_encoders is None:
            self.base_text_encoders = list(self.text_encoders)


def load_models(config) -> TrainingModels:
    """Load the base model offline, freeze it and add the LoRA(s). SetupError for an unsupported family or bad LoRA
    targets (before anything is trained)."""
    from diffusers import DDPMScheduler

    try:
        detect_family(config.model)
        pipeline = load_sd_pipeline(config.model, config.family)
    except (UnsupportedModelError, FileNotFoundError) as error:
        raise SetupError(f"Cannot use --model: {error}") from error
    family = pipeline_family(pipeline)
    text_encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if family == "sdxl" else [])
    tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if family == "sdxl" else [])
    for module in (pipeline.vae, *text_encoders):
        module.requires_grad_(False).eval()
    try:
        add_lora(pipeline.unet, rank=config.rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                 target_modules=config.target_modules, component="unet")
        if config.train_text_encoder:
            for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders):
                add_lora(encoder, rank=config.rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                         target_modules=config.text_encoder_target_modules, component=name)
    except (ValueError, TypeError) as error:
        raise SetupError(f"Cannot add the LoRA: {error}") from error
    if config.gradient_checkpointing:
        set_gradient_checkpointing(pipeline.unet, True)
        if config.train_text_encoder:
            for encoder in text_encoders:
                set_gradient_checkpointing(encoder, True)
    native = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    return TrainingModels(
        family=family, unet=pipeline.unet, vae=pipeline.vae, tokenizers=tokenizers, text_encoders=text_encoders,
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
        resolution=config.resolution or int(native), trains_text_encoder=config.train_text_encoder,
        sampling_scheduler_config=dict(pipeline.scheduler.config),
        force_zeros_for_empty_prompt=bool(pipeline.config.get("force_zeros_for_empty_prompt", False)),
    )


def encode_prompts(models: TrainingModels, prompts: list[str], device: torch.device, reference: bool = False):
    """Text conditioning as diffusers' SD1.5 / SDXL training scripts build it.

    Returns ``(hidden_states (P, 77, D), added_cond_kwargs or None)``; for SDXL the penultimate hidden states of
    both encoders concatenated, the pooled projection of the second, and time ids (size, crop (0, 0), size).
    reference: use the plain modules (for the reference pass inside ``adapters_disabled``)."""
    encoders = models.base_text_encoders if reference else models.text_encoders
    states, pooled = [], None
    for tokenizer, encoder in zip(models.tokenizers, encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        if models.family == "sd15":
            states.append(encoder(ids)[0])
        else:
            output = encoder(ids, output_hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled = output[0]  # the last encoder's text_embeds (CLIPTextModelWithProjection)
    hidden = torch.cat(states, dim=-1)
    if models.family == "sd15":
        return hidden, None
    side = models.resolution
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=hidden.dtype, device=device).repeat(len(prompts), 1)
    return hidden, {"text_embeds": pooled, "time_ids": time_ids}


def expand_conditioning(conditioning, index: torch.Tensor):
    """Rows ``index`` of an :func:`encode_prompts` result (one prompt per group -> one row per image)."""
    hidden, added = conditioning
    return hidden[index], None if added is None else {key: value[index] for key, value in added.items()}


def check_output(config) -> Path:
    """Refuse an existing LoRA file (unless --overwrite) and an output folder that cannot be written, before any
    long work. Returns the LoRA's path."""
    output = output_path(config)
    refuse_existing_output(output, config.overwrite)
    check_writable_folder(config.training.output_dir)
    return output


def output_path(config) -> Path:
    """``<output-dir>/<output-name>.safetensors``."""
    return config.training.output_dir / f"{config.output_name}.safetensors"


# ------------------------------------------------------------------------------------------------ training set-up
@dataclass
class PreparedTraining(Optimization):
    """What a LoRA trainer's loop needs after :func:`prepare_lora_training`: the :class:`~.loop.Optimization`
    (``modules``: the UNet, then the text encoders when trained, accelerate-prepared; the prepared ``optimizer`` /
    ``scheduler``; the trainable ``parameters``), plus ``trained`` (the same modules unwrapped), the trainable
    tensors' ``names`` per module and the ``weight_dtype`` the frozen weights run in."""

    trained: list
    names: list
    weight_dtype: torch.dtype


def prepare_lora_training(config, models: TrainingModels, accelerator) -> PreparedTraining:
    """Move the models to the accelerator's device (frozen weights in the mixed-precision dtype, LoRA weights kept
    in float32), build AdamW + the schedule (``optim.py``), ``accelerator.prepare`` them, point ``models.unet`` /
    ``models.text_encoders`` at the wrapped modules and register the checkpoint hooks that save only the LoRA
    tensors (``checkpoint.py``)."""
    from .checkpoint import register_trainable_state_hooks
    from .optim import make_optimizer, make_scheduler

    training = config.training
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (models.vae, *models.text_encoders, models.unet):
        module.to(accelerator.device)
        if weight_dtype != torch.float32:
            module.to(weight_dtype)
    trained = [models.unet] + (list(models.text_encoders) if config.train_text_encoder else [])
    if weight_dtype != torch.float32:
        from diffusers.training_utils import cast_training_params

        cast_training_params(trained, dtype=torch.float32)  # LoRA weights train in float32
    names = [[name for name, parameter in module.named_parameters() if parameter.requires_grad] for module in trained]
    optimizer = make_optimizer(torch.nn.ModuleList(trained), training)
    scheduler = make_scheduler(optimizer, training, accelerator.num_processes)
    prepared = accelerator.prepare(*trained, optimizer, scheduler)
    wrapped, optimizer, scheduler = list(prepared[: len(trained)]), prepared[-2], prepared[-1]
    models.unet = wrapped[0]
    if config.train_text_encoder:
        models.text_encoders = wrapped[1:]
    for index, (module, module_names) in enumerate(zip(trained, names)):
        file_name = "trainable_unet.safetensors" if index == 0 else f"trainable_text_encoder_{index}.safetensors"
        register_trainable_state_hooks(accelerator, module, module_names, file_name)
    parameters = [parameter for module in trained for parameter in module.parameters() if parameter.requires_grad]
    return PreparedTraining(wrapped, optimizer, scheduler, parameters, trained, names, weight_dtype)


def export_trained_lora(output: Path, config, models: TrainingModels, method: str, config_dict: dict,
                        metadata: dict) -> Path:
    """Write the LoRA(s) of ``models`` for ComfyUI and diffusers (``core/lora_export.py``), atomically."""
    from ...core.lora_export import export_comfyui_lora

    text_encoders = None
    if config.train_text_encoder:
        text_encoders = dict(zip(("text_encoder", "text_encoder_2"), models.base_text_encoders))
    return export_comfyui_lora(output, base_family=models.family, method=method, unet=models.base_unet,
                               text_encoders=text_encoders, training_args=config_dict, metadata=metadata)
