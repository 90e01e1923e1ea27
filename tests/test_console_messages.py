"""The console commands' Ctrl-C messages (``trainers/common/console.py``): the command that resumes keeps every
argument as typed (quoted for the shell), replaces any spelling of --resume-from, and the message names the step
and the checkpoint. Pure functions, no model."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from comfyui_refinery.trainers.common import console
from comfyui_refinery.trainers.common.checkpoint import STATE_FILE, STATE_FORMAT


def make_checkpoint(output: Path, step: int, latest: bool = True) -> Path:
    folder = output / "checkpoints" / f"step-{step}"
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(json.dumps({"format": STATE_FORMAT, "step": step}))
    if latest:
        (output / "checkpoints" / "latest").write_text(f"step-{step}\n")
    return folder


def test_every_spelling_of_resume_from_is_replaced_and_other_flags_are_kept():
    arguments = ["--dataset", "my data/set", "--resume-from", "runs/x/checkpoints/step-2", "--resolution", "64",
                 "--resume-from=auto", "--resu", "latest", "--rank", "4"]
    assert console.without_resume_flag(arguments) == ["--dataset", "my data/set", "--resolution", "64", "--rank", "4"]
    command = console.resume_command("refinery-train-rankdpo", arguments, Path("step-2"))
    assert shlex.split(command) == ["refinery-train-rankdpo", "--dataset", "my data/set", "--resolution", "64",
                                    "--rank", "4", "--resume-from", "latest"]
    assert shlex.split(console.resume_command("x", arguments, None)) == ["x", "--dataset", "my data/set",
                                                                         "--resolution", "64", "--rank", "4"]


def test_messages_name_the_step_the_checkpoint_and_the_command(tmp_path):
    arguments = ["--output-dir", str(tmp_path)]
    checkpoint = make_checkpoint(tmp_path, 4)
    text = console.interrupt_message("refinery-train-preference", "m", arguments,
                                     console.TrainingInterrupted(5, 10, checkpoint, saved_now=True))
    assert f"interrupted after step 5 of 10. Checkpoint: {checkpoint} (step 4, saved now)" in text
    assert text.endswith("--resume-from latest")
    # interrupted while a resumed run was loading: run.step is still 0
    text = console.interrupt_message("p", "m", arguments, console.TrainingInterrupted(0, 10, checkpoint))
    assert "while setting up, before continuing from step 4 of 10" in text and "the last one saved" in text
    text = console.interrupt_message("p", "m", arguments, KeyboardInterrupt())
    assert "interrupted before training started" in text and "--resume-from" not in text


def test_the_last_checkpoint_is_found_with_or_without_its_pointer(tmp_path):
    assert console.latest_checkpoint(tmp_path) is None
    make_checkpoint(tmp_path, 2)
    newest = make_checkpoint(tmp_path, 4, latest=False)  # a crash between the folder and its pointer
    assert console.latest_checkpoint(tmp_path).name == "step-2"
    (tmp_path / "checkpoints" / "latest").unlink()
    assert console.latest_checkpoint(tmp_path) == newest
