"""The optimiser-step loop every trainer runs (STYLE.md section 4). A trainer supplies its step function (one
micro-batch -> loss and statistics) and its export; the loop does everything else, the same way for all of them.

Before the first step: ``training_config.json`` (main process), resume from ``--resume-from``'s checkpoint (options
that differ from the checkpoint's run are named in a warning; ``--resume-from`` and ``--overwrite`` themselves are
not), the data order continued at the resumed micro-batch.

Per micro-batch: ``accelerator.accumulate`` over the trained modules; the step function under
``accelerator.autocast``; a NaN/inf guard (:class:`NonFiniteLossError`: nothing of the step is applied, nothing is
written, the last good checkpoint is kept); backward; gradient clipping at ``--max-grad-norm`` when the gradients
are synchronised; optimiser and learning-rate steps.

Per optimiser step: the trainer's ``after_step`` hook, tqdm progress, a log line every ``--log-every`` steps, a
checkpoint every ``--checkpointing-steps`` steps, and Ctrl-C (``console.TrainingRun``: finish the step, save a
checkpoint, stop with :class:`~.console.TrainingInterrupted`).

After the last step: the trainer's export on the main process, then ``accelerator.end_training()``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .checkpoint import load_checkpoint, save_checkpoint
from .config import SetupError, TrainingConfig, config_differences, write_config
from .console import TrainingRun, latest_checkpoint
from .data import StepBatchSampler

logger = logging.getLogger(__name__)

# options a resumed run may change without a warning
IGNORED_ON_RESUME = ("training.resume_from", "overwrite")


class NonFiniteLossError(SetupError):
    """The loss of a micro-batch became NaN or infinite; nothing of that step was applied."""


@dataclass
class StepOutput:
    """What a trainer's step function returns for one micro-batch: the scalar ``loss`` to backpropagate, detached
    ``stats`` (name -> float) for the log and the progress bar, and ``details``, anything the trainer's
    ``after_step`` hook needs (e.g. Focus-N-Fix's sampled pictures)."""

    loss: torch.Tensor
    stats: dict[str, float]
    details: Any = None


@dataclass
class Optimization:
    """The accelerate-prepared objects the loop steps: ``modules`` (what the step trains through; ``accumulate`` and
    ``train()`` apply to them), ``optimizer``, learning-rate ``scheduler``, and the trainable ``parameters`` (for
    gradient clipping)."""

    modules: list
    optimizer: Any
    scheduler: Any
    parameters: list


StepFunction = Callable[[Any, int, int], StepOutput]
"""``(batch, micro_index, step) -> StepOutput``: the loss of micro-batch ``micro_index`` (0-based over the run, the
key of its random draws) during optimiser step ``step`` (0-based: the number of steps already done)."""


def make_step_sampler(training: TrainingConfig, accelerator, num_items: int, item_name: str) -> StepBatchSampler:
    """The run's :class:`StepBatchSampler` over ``num_items`` items (``max_train_steps`` x accumulation
    micro-batches); SetupError, naming ``item_name``, when there are fewer items than one batch."""
    try:
        return StepBatchSampler(num_items, training.train_batch_size, training.seed, 0,
                                training.max_train_steps * training.gradient_accumulation_steps,
                                accelerator.num_processes, accelerator.process_index, item_name=item_name)
    except ValueError as error:
        raise SetupError(str(error)) from error


def resume_training(accelerator, checkpoint: Path | None, config_dict: dict) -> int:
    """Load ``checkpoint`` (None: a fresh run) into the prepared objects; warn about options that differ from the
    checkpoint's run (except :data:`IGNORED_ON_RESUME`). Returns the optimiser step to continue from."""
    if checkpoint is None:
        return 0
    state = load_checkpoint(accelerator, checkpoint)
    changed = [line for line in config_differences(state.get("config", {}), config_dict)
               if not line.startswith(IGNORED_ON_RESUME)]
    if changed:
        logger.warning("Resuming with changed options: %s", "; ".join(changed))
    return int(state["step"])


def check_finite_loss(output: StepOutput, step: int, output_dir: Path, advice: str) -> None:
    """:class:`NonFiniteLossError` when ``output.loss`` is NaN or infinite at optimiser step ``step`` (1-based),
    naming the step, the other statistics, the last good checkpoint and ``advice`` (what to change on resuming)."""
    loss = float(output.loss.detach())
    if math.isfinite(loss):
        return
    others = ", ".join(f"{name} {value:.4g}" for name, value in output.stats.items() if name != "loss")
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        kept = f"No checkpoint was saved yet: start again with {advice}."
    else:
        kept = f"The last good checkpoint is kept in '{checkpoint}': resume from it with {advice}."
    raise NonFiniteLossError(f"The loss became {loss} at step {step}" + (f" ({others})" if others else "") +
                             f"; nothing of this step was applied and the trained model was not written. {kept}")


def run_training_loop(
    accelerator,
    training_run: TrainingRun,
    training: TrainingConfig,
    optimization: Optimization,
    step_function: StepFunction,
    *,
    dataset,
    collate_fn: Callable,
    sampler: StepBatchSampler,
    resume: Path | None,
    config_dict: dict,
    export: Callable[[int], Any],
    description: str,
    progress_stats: Mapping[str, str],
    nan_advice: str,
    checkpoint_extra: Mapping[str, Any] | None = None,
    after_step: Callable[[int, StepOutput], None] | None = None,
) -> int:
    """Run the training from ``resume`` (None: step 0) to ``training.max_train_steps`` (module docstring).

    dataset / collate_fn / sampler: the data (the loader is built here, at the resumed micro-batch).
    config_dict: the run's options as JSON (``training_config.json``, the checkpoints, the resume comparison);
    checkpoint_extra: more JSON for every checkpoint's trainer state. export: ``export(step)`` writes the trained
    model (main process only, after the last step). description: the progress bar's label; progress_stats: bar label
    -> stat name shown beside it. nan_advice: what to change when the loss becomes NaN ("a lower
    --learning-rate"). after_step: ``after_step(step, output)`` on every process after optimiser step ``step``
    (1-based), with the last micro-batch's output. Returns the last step.
    """
    from tqdm.auto import tqdm

    if accelerator.is_main_process:
        write_config(config_dict, training.output_dir)
    step = resume_training(accelerator, resume, config_dict)
    sampler.start = step * training.gradient_accumulation_steps
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                        num_workers=training.dataloader_num_workers)
    progress = tqdm(total=training.max_train_steps, initial=step, desc=description,
                    disable=not accelerator.is_local_main_process)
    for module in optimization.modules:
        module.train()
    state = {"config": config_dict, **(checkpoint_extra or {})}
    micro_index = sampler.start
    training_run.step = step

    def checkpoint() -> Path:
        return save_checkpoint(accelerator, training.output_dir, step, state, training.checkpoints_total_limit)

    with training_run.stop_at_step_boundary(), progress:  # the bar is closed before any message
        for batch in loader:
            with accelerator.accumulate(*optimization.modules):
                with accelerator.autocast():
                    output = step_function(batch, micro_index, step)
                check_finite_loss(output, step + 1, training.output_dir, nan_advice)
                accelerator.backward(output.loss)
                if accelerator.sync_gradients and training.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(optimization.parameters, training.max_grad_norm)
                optimization.optimizer.step()
                optimization.scheduler.step()
                optimization.optimizer.zero_grad(set_to_none=True)
            micro_index += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            if after_step is not None:
                after_step(step, output)
            progress.update(1)
            progress.set_postfix({label: f"{output.stats[name]:.4g}" for label, name in progress_stats.items()})
            if step % training.log_every == 0:
                logger.info("step %d: %s, lr %.3g", step, ", ".join(f"{k} {v:.4g}" for k, v in output.stats.items()),
                            optimization.scheduler.get_last_lr()[0])
            saved = step % training.checkpointing_steps == 0
            if saved:
                checkpoint()
            training_run.stop_if_requested(accelerator, step, checkpoint, saved)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export(step)
    accelerator.end_training()
    return step
