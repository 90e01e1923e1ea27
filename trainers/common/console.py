"""What every console command of the pack shares: exit statuses a script can trust, and a Ctrl-C that stops cleanly.

Exit statuses: 0 done, 1 an unusable input (the message says what to change), 2 a bad flag (argparse), 130
interrupted (Ctrl-C, as shells report SIGINT). Each command's ``main()`` returns the status (the console wrapper
calls ``sys.exit(main())``); its ``run()`` does the same work and returns the output path, for Python callers.

Ctrl-C during training (:class:`TrainingRun`): the first one lets the optimiser step in progress finish, saves a
checkpoint at that step (unless one was just saved), and stops; a second one stops at once, keeping the last
checkpoint. Either way the command prints the step, the checkpoint and the exact command that resumes, and exits
with status 130. A checkpoint saved on Ctrl-C is written at the same point of the loop as the periodic ones, so a
resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .checkpoint import LATEST, CheckpointError, checkpoints_dir, list_checkpoints, read_trainer_state
from .config import SetupError
from .data import DatasetError

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT
RESUME_FLAG = "--resume-from"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# what every trainer reports as an unusable input (exit status 1 with the message, no traceback)
USER_ERRORS = (DatasetError, CheckpointError, SetupError)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a training run. step: the last completed optimiser step (of ``max_steps``); checkpoint: the
    checkpoint folder a resume continues from (None: no checkpoint yet); saved_now: whether that checkpoint was
    saved because of this interrupt."""

    def __init__(self, step: int, max_steps: int, checkpoint: Path | None, saved_now: bool = False):
        super().__init__(f"interrupted after step {step} of {max_steps}")
        self.step, self.max_steps, self.checkpoint, self.saved_now = step, max_steps, checkpoint, saved_now


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint folder ``<output_dir>/checkpoints/latest`` names, else the newest complete one, else None."""
    pointer = checkpoints_dir(output_dir) / LATEST
    if pointer.is_file():
        folder = pointer.parent / pointer.read_text(encoding="utf-8").strip()
        try:
            read_trainer_state(folder)
            return folder
        except CheckpointError:
            pass
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


class TrainingRun:
    """Where a training run is, for Ctrl-C. Use it around the whole run (``with TrainingRun(...) as run:``): any
    KeyboardInterrupt inside becomes a :class:`TrainingInterrupted` naming ``run.step`` and the last checkpoint.
    Around the loop, ``with run.stop_at_step_boundary():`` makes the first Ctrl-C a request that the loop honours
    with :meth:`stop_if_requested` after a completed optimiser step."""

    def __init__(self, output_dir: str | Path, max_steps: int):
        self.output_dir = Path(output_dir)
        self.max_steps = max_steps
        self.step = 0
        self._requested = False

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is not None and issubclass(kind, KeyboardInterrupt) and not isinstance(error, TrainingInterrupted):
            raise TrainingInterrupted(self.step, self.max_steps, latest_checkpoint(self.output_dir)) from error
        return False

    @contextlib.contextmanager
    def stop_at_step_boundary(self):
        """While active, the first SIGINT only sets a flag (and says so); a second one raises KeyboardInterrupt at
        once. Does nothing outside the main thread (where Python cannot install signal handlers) and where SIGINT is
        not Python's default KeyboardInterrupt (ignored, e.g. a background job, or handled by the caller)."""
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            yield self
            return

        def request(signum, frame):
            if self._requested:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self._requested = True
            print(f"\nCtrl-C: finishing step {self.step + 1} and saving a checkpoint (press Ctrl-C again to stop at "
                  f"once, keeping the last checkpoint).", file=sys.stderr, flush=True)

        previous = signal.signal(signal.SIGINT, request)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def request_stop(self) -> None:
        """What the first Ctrl-C does (for callers that stop a run themselves)."""
        self._requested = True

    def stop_requested(self, accelerator) -> bool:
        """Whether any process asked to stop (one tiny all-reduce per step when there are several processes, so all
        of them stop at the same step)."""
        if accelerator.num_processes == 1:
            return self._requested
        flag = torch.tensor([1.0 if self._requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def stop_if_requested(self, accelerator, step: int, save: Callable[[], Path], saved: bool) -> None:
        """Call after optimiser step ``step`` (and its periodic checkpoint): on a stop request, save a checkpoint with
        ``save()`` unless ``saved`` (one was just written for this step), and raise :class:`TrainingInterrupted`.
        A request during the last step is ignored: the run finishes and writes its output instead."""
        self.step = step
        if step >= self.max_steps or not self.stop_requested(accelerator):
            return
        checkpoint = latest_checkpoint(self.output_dir) if saved else save()
        raise TrainingInterrupted(step, self.max_steps, checkpoint, saved_now=not saved)


# ------------------------------------------------------------------------------------------------ messages
def invoked_as(prog: str, module: str) -> str:
    """How the user started the command: ``prog`` when run as the installed console script, else
    ``python -m module``."""
    if Path(sys.argv[0]).name == prog:
        return prog
    return f"{Path(sys.executable).name} -m {module}"


def _is_resume_flag(token: str) -> bool:
    name = token.split("=", 1)[0]
    return len(name) > len("--res") and RESUME_FLAG.startswith(name)  # argparse accepts unique abbreviations


def without_resume_flag(arguments: Sequence[str]) -> list[str]:
    """``arguments`` without ``--resume-from X`` / ``--resume-from=X`` (or an abbreviation of the flag)."""
    kept, skip = [], False
    for token in arguments:
        if skip:
            skip = False
            continue
        if _is_resume_flag(token):
            skip = "=" not in token
            continue
        kept.append(token)
    return kept


def resume_command(command: str, arguments: Sequence[str], checkpoint: Path | None) -> str:
    """The command line that continues an interrupted run: the same arguments, with ``--resume-from latest`` when
    there is a checkpoint (without any --resume-from when there is none: a plain rerun starts afresh)."""
    arguments = without_resume_flag(arguments)
    if checkpoint is not None:
        arguments += [RESUME_FLAG, "latest"]
    return " ".join([command, *(shlex.quote(str(argument)) for argument in arguments)])


def interrupt_message(prog: str, module: str, arguments: Sequence[str], interrupt: KeyboardInterrupt) -> str:
    """What a trainer prints on Ctrl-C: the step, the checkpoint, the command that resumes."""
    command = invoked_as(prog, module)
    if not isinstance(interrupt, TrainingInterrupted):  # before the run started (parsing, imports)
        return (f"{prog}: interrupted before training started; nothing was trained. Run the same command again:\n"
                f"  {resume_command(command, arguments, None)}")
    where = f"after step {interrupt.step} of {interrupt.max_steps}"
    if interrupt.checkpoint is None:
        return (f"{prog}: interrupted {where}; no checkpoint was saved yet, so the next run starts from step 0. "
                f"Run the same command again:\n  {resume_command(command, arguments, None)}")
    checkpoint_step = read_trainer_state(interrupt.checkpoint)["step"]
    if interrupt.step < checkpoint_step:  # while a resumed run was loading
        where = f"while setting up, before continuing from step {checkpoint_step} of {interrupt.max_steps}"
    saved = "saved now" if interrupt.saved_now else "the last one saved"
    return (f"{prog}: interrupted {where}. Checkpoint: {interrupt.checkpoint} (step {checkpoint_step}, {saved}). "
            f"Resume with:\n  {resume_command(command, arguments, interrupt.checkpoint)}")


def run_console(prog: str, module: str, run: Callable[[list[str] | None], Path], input_args: list[str] | None,
                errors: tuple[type[BaseException], ...] = ()) -> int:
    """A trainer's ``main()``: logging to stderr, ``run(input_args)``; an unusable input (:data:`USER_ERRORS`, and
    ``errors``) exits with status 1 and the message (SystemExit), Ctrl-C prints :func:`interrupt_message` and
    returns 130, success returns 0."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    arguments = list(sys.argv[1:] if input_args is None else input_args)
    try:
        run(arguments)
    except (*USER_ERRORS, *errors) as error:
        raise SystemExit(f"{prog}: error: {error}") from error
    except KeyboardInterrupt as interrupt:
        if is_main_process():
            print(interrupt_message(prog, module, arguments, interrupt), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return EXIT_OK


def is_main_process() -> bool:
    """False in the other processes of an ``accelerate launch`` / ``torchrun`` run (they say nothing on Ctrl-C)."""
    return os.environ.get("RANK", "0") == "0"
