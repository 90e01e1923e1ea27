"""Pieces every trainer shares (STYLE.md section 4).

- ``config``: the frozen ``TrainingConfig`` and ``LoraTrainingOptions`` dataclasses, their flags and checks, JSON form;
- ``accelerate_setup``: the ``Accelerator`` (``ProjectConfiguration``, ``set_seed``, threads), per-step seeds;
- ``optim``: AdamW parameter groups, warm-up + cosine schedule;
- ``checkpoint``: atomic ``checkpoints/step-<n>``, ``latest`` pointer, rotation, exact resume (``--resume-from
  latest|auto|<folder>``);
- ``console``: exit statuses, Ctrl-C (finish the step, save a checkpoint, print the command that resumes);
- ``loop``: the one optimiser-step loop every trainer runs with its own step function (accumulation, clipping, NaN
  guard, progress, logging, checkpoints, resume, Ctrl-C, export);
- ``data``: dataset files and their line-numbered errors, prompt lists, images, the resumable batch sampler;
- ``sd_models``: the SD1.5 / SDXL side of the LoRA trainers (models, prompts, LoRA set-up and export);
- ``atomic``: atomic file and folder writes;
- ``model_loading``: SD1.5/SDXL pipelines from diffusers folders or single-file checkpoints, offline;
- ``lora``: peft LoRA setup, ``adapters_disabled`` (reference model = same UNet), gradient checkpointing.
"""
