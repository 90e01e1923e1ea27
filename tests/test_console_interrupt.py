"""Ctrl-C on a console trainer, for real: SIGINT to a running ``refinery-train-rankdpo`` subprocess (tiny-sd) after
its first step. It finishes the step in progress, saves a checkpoint, prints the step, the checkpoint and the command
that resumes, and exits with status 130; that command, run as printed, continues from that checkpoint (and is
interrupted the same way one step later). The run is long (1000 steps) so that no machine is fast enough to finish
it before the signal arrives; exactness of a resume is checked in-process in the trainers' own tests."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
from pathlib import Path

from tiny_models import SUBPROCESS_ENV, TINY_SD, console_command, write_synpic_dataset

PROG = "refinery-train-rankdpo"
STEPS = 1000


def interrupted_run(arguments: list[str], after: str) -> tuple[int, str]:
    """Run the console command, press Ctrl-C (SIGINT) once stderr shows ``after``; (exit status, stderr)."""
    process = subprocess.Popen([*console_command(PROG), *arguments], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if after in line:
                break
        process.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal does
        stderr = "".join(lines) + process.stderr.read()
        return process.wait(timeout=600), stderr
    finally:
        process.kill()


def checkpoint_saved(stderr: str, output: Path) -> int:
    """The step the message names; checks that its checkpoint was saved by this interrupt and exists."""
    match = re.search(rf"{PROG}: interrupted after step (\d+) of {STEPS}\. Checkpoint: (\S+) \(step (\d+), saved "
                      rf"now\)", stderr)
    assert match, stderr
    step = int(match.group(1))
    assert int(match.group(3)) == step and Path(match.group(2)) == output / "checkpoints" / f"step-{step}"
    assert Path(match.group(2)).is_dir()
    return step


def test_sigint_saves_a_checkpoint_exits_130_and_the_printed_command_resumes(tmp_path):
    dataset = write_synpic_dataset(tmp_path / "data", prompts=2, k=2)
    output = tmp_path / "run"
    arguments = ["--dataset", str(dataset), "--model", str(TINY_SD), "--output-dir", str(output),
                 "--max-train-steps", str(STEPS), "--train-batch-size", "2", "--checkpointing-steps", "100000",
                 "--lr-warmup-steps", "0", "--log-every", "1", "--threads", "1", "--resume-from", "auto"]
    status, stderr = interrupted_run(arguments, "step 1: loss")  # training has started once step 1 is logged
    assert status == 130, stderr
    assert "Ctrl-C: finishing step" in stderr and "Traceback" not in stderr, stderr
    step = checkpoint_saved(stderr, output)
    assert step >= 1 and not (output / "rankdpo_lora.safetensors").exists()

    printed = shlex.split(stderr.split("Resume with:\n", 1)[1].strip().splitlines()[0])
    assert printed[0] == PROG  # as the user typed it
    assert printed[1:] == arguments[:-2] + ["--resume-from", "latest"]
    status, stderr = interrupted_run(printed[1:], f"step {step + 1}: loss")
    assert status == 130, stderr
    assert f"Resumed from {output / 'checkpoints' / f'step-{step}'} at step {step}" in stderr
    assert checkpoint_saved(stderr, output) > step
