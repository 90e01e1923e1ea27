"""``refinery-train-preference`` end to end on a tiny open_clip ViT and a few toy-world pairs (seconds on CPU):
the output file and its metadata, exact resume after a simulated kill, rotation and the ``latest`` pointer,
line-numbered dataset errors that write nothing, and clear errors for bad flags."""

from __future__ import annotations

import json
import os
import shlex
import signal

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from comfyui_refinery.benchmarks.toyworld import preference_data
from comfyui_refinery.trainers.stable_preference import train as trainer
from tiny_models import TINY_VIT_CONFIG, build_tiny_vit, torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")
PAIRS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint, dataset folder): a tiny ViT CLIP with its config beside it, 8 toy pairs at 32 px (the training
    split's format, 2 labels flipped) and the same pairs in the image_0/image_1/label format."""
    with torch_threads(1):
        root = tmp_path_factory.mktemp("preference")
        checkpoint = build_tiny_vit(root / "models", "tiny-pref-vit", TINY_VIT_CONFIG, seed=0)
        preference_data.build_split(root / "pairs", PAIRS, preference_data.TRAIN_SEED_OFFSET, flip_fraction=0.25,
                                    resolution=32)
        preference_data.build_split(root / "labelled", PAIRS, preference_data.TEST_SEED_OFFSET, label_format=True,
                                    resolution=32)
        return checkpoint, root / "pairs", root / "labelled"


def _args(checkpoint, dataset, output, *extra):
    return [
        "--dataset", str(dataset), "--checkpoint", str(checkpoint), "--output-dir", str(output),
        "--max-train-steps", "6", "--train-batch-size", "2", "--gradient-accumulation-steps", "2",
        "--learning-rate", "1e-3", "--checkpointing-steps", "2", "--checkpoints-total-limit", "2",
        "--augmentations", "2", "--trainable-image-layers", "2", "--trainable-text-layers", "1",
        "--threads", "1", "--log-every", "100", *extra,
    ]


class SimulatedKill(Exception):
    pass


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    checkpoint, dataset, _ = setup
    output = tmp_path_factory.mktemp("full")
    path = trainer.run(_args(checkpoint, dataset, output))
    return output, path


def test_output_loads_as_a_reward_model(full_run):
    """What the trainer writes is what the reward loader (and the Load Reward Model node) reads: auto-detected as
    "trained", scores one number per image."""
    import torch

    from comfyui_refinery.core.rewards import detect_reward_kind, load_reward_model

    _, path = full_run
    assert detect_reward_kind(path) == "trained"
    reward = load_reward_model(path)
    scores = reward.score(torch.rand(2, 40, 40, 3), ["a red circle", "a blue square"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_output_file_and_metadata(setup, full_run):
    checkpoint, _, _ = setup
    output, path = full_run
    assert path == output / "reward.safetensors" and path.is_file()
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    assert metadata["refinery.format"] == "reward-clip/1"
    assert metadata["refinery.method"] == "stable-preference"
    assert metadata["refinery.score"] == "cosine"
    assert metadata["refinery.architecture"] == ""  # config came from the JSON beside the checkpoint
    assert json.loads(metadata["refinery.open_clip_config"]) == TINY_VIT_CONFIG
    training = json.loads(metadata["refinery.training"])
    assert training["loss"] == "stable-preference" and training["training"]["max_train_steps"] == 6
    assert json.loads((output / "training_config.json").read_text()) == training
    assert json.loads((output / "reward.json").read_text()) == TINY_VIT_CONFIG
    # the full state dict; trained blocks changed, frozen ones did not
    base, trained = load_file(str(checkpoint)), load_file(str(path))
    assert keys == set(base)
    assert torch.equal(trained["visual.transformer.resblocks.0.attn.in_proj_weight"],
                       base["visual.transformer.resblocks.0.attn.in_proj_weight"])
    assert torch.equal(trained["transformer.resblocks.0.mlp.c_fc.weight"], base["transformer.resblocks.0.mlp.c_fc.weight"])
    assert not torch.equal(trained["visual.transformer.resblocks.3.attn.in_proj_weight"],
                           base["visual.transformer.resblocks.3.attn.in_proj_weight"])
    assert not torch.equal(trained["transformer.resblocks.1.mlp.c_fc.weight"], base["transformer.resblocks.1.mlp.c_fc.weight"])
    # rotation kept the newest two; latest names the newest; no temporary folder left
    checkpoints = output / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-4", "step-6"]
    assert (checkpoints / "latest").read_text().strip() == "step-6"
    assert json.loads((checkpoints / "step-6" / "trainer_state.json").read_text())["step"] == 6


def test_killed_run_resumes_exactly(setup, full_run, tmp_path, monkeypatch):
    checkpoint, dataset, _ = setup
    reference = load_file(str(full_run[1]))
    output = tmp_path / "killed"
    real_loss = trainer.batch_loss

    def dying_loss(config, model, tokenizer, batch, step, *rest):
        if step == 4:  # after checkpoint step-4 was written, inside step 5
            raise SimulatedKill
        return real_loss(config, model, tokenizer, batch, step, *rest)

    monkeypatch.setattr(trainer, "batch_loss", dying_loss)
    with pytest.raises(SimulatedKill):
        trainer.main(_args(checkpoint, dataset, output))
    assert not (output / "reward.safetensors").exists()
    assert (output / "checkpoints" / "latest").read_text().strip() == "step-4"
    monkeypatch.setattr(trainer, "batch_loss", real_loss)
    # a fresh start into the same folder is refused (it would mix two runs' checkpoints)
    with pytest.raises(SystemExit, match="--resume-from latest"):
        trainer.main(_args(checkpoint, dataset, output))
    # resuming with other layer-freezing options, or past the step count, is refused before anything changes
    with pytest.raises(SystemExit, match="trained other parameters"):
        trainer.main(_args(checkpoint, dataset, output, "--resume-from", "latest", "--trainable-image-layers", "1"))
    with pytest.raises(SystemExit, match="past --max-train-steps 3"):
        trainer.main(_args(checkpoint, dataset, output, "--resume-from", "latest", "--max-train-steps", "3"))
    path = trainer.run(_args(checkpoint, dataset, output, "--resume-from", "latest"))
    resumed = load_file(str(path))
    assert resumed.keys() == reference.keys()
    different = [key for key in reference if not torch.equal(reference[key], resumed[key])]
    assert not different, f"resumed run differs from the uninterrupted one in {different[:5]}"


def test_resume_from_auto_starts_fresh_then_resumes_exactly(setup, full_run, tmp_path, monkeypatch, caplog):
    """--resume-from auto, the one spelling for scripts: a fresh start where there is no checkpoint (where 'latest'
    is refused), the latest checkpoint where there is one (where a plain rerun is refused)."""
    checkpoint, dataset, _ = setup
    output = tmp_path / "auto"
    real_loss = trainer.batch_loss

    def dying_loss(config, model, tokenizer, batch, step, *rest):
        if step == 4:
            raise SimulatedKill
        return real_loss(config, model, tokenizer, batch, step, *rest)

    monkeypatch.setattr(trainer, "batch_loss", dying_loss)
    with pytest.raises(SimulatedKill), caplog.at_level("INFO"):
        trainer.run(_args(checkpoint, dataset, output, "--resume-from", "auto"))
    assert "no checkpoint" in caplog.text and "starting fresh" in caplog.text
    monkeypatch.setattr(trainer, "batch_loss", real_loss)
    caplog.clear()
    with caplog.at_level("WARNING"):  # --overwrite changes no training: resumed without a warning
        path = trainer.run(_args(checkpoint, dataset, output, "--resume-from", "auto", "--overwrite"))
    assert "Resuming with changed options" not in caplog.text
    resumed, reference = load_file(str(path)), load_file(str(full_run[1]))
    assert [key for key in reference if not torch.equal(reference[key], resumed[key])] == []
    # the newest complete checkpoint when a crash came between a first checkpoint and its pointer
    (output / "checkpoints" / "latest").unlink()
    from comfyui_refinery.trainers.common.checkpoint import resume_point

    folder, state = resume_point(output, "auto", 6)
    assert folder.name == "step-6" and state["step"] == 6
    assert resume_point(tmp_path / "empty", "auto", 6) == (None, {})


def test_ctrl_c_saves_a_checkpoint_at_the_step_and_a_second_one_stops_at_once(setup, full_run, tmp_path,
                                                                              monkeypatch, capsys):
    """First Ctrl-C (a real SIGINT) inside step 3: the step finishes, step-3 is saved (checkpoints are due at 2, 4,
    6), exit status 130, the message names the step, the checkpoint and the command; the resumed run equals the
    uninterrupted one bit for bit. Two Ctrl-C inside step 3: it stops at once, keeping step-2."""
    checkpoint, dataset, _ = setup
    real_loss = trainer.batch_loss
    presses = {"count": 1}

    def ctrl_c_in_step_three(config, model, tokenizer, batch, step, *rest):
        if step == 2:
            for _ in range(presses.pop("count", 0)):
                os.kill(os.getpid(), signal.SIGINT)
        return real_loss(config, model, tokenizer, batch, step, *rest)

    monkeypatch.setattr(trainer, "batch_loss", ctrl_c_in_step_three)
    output = tmp_path / "once"
    assert trainer.main(_args(checkpoint, dataset, output)) == 130
    message = capsys.readouterr().err
    assert "Ctrl-C: finishing step 3 and saving a checkpoint" in message
    assert "refinery-train-preference: interrupted after step 3 of 6." in message
    assert f"Checkpoint: {output / 'checkpoints' / 'step-3'} (step 3, saved now)" in message
    assert "--resume-from latest" in message and not (output / "reward.safetensors").exists()
    assert (output / "checkpoints" / "latest").read_text().strip() == "step-3"
    monkeypatch.setattr(trainer, "batch_loss", real_loss)
    path = trainer.run(_args(checkpoint, dataset, output, "--resume-from", "latest"))
    resumed, reference = load_file(str(path)), load_file(str(full_run[1]))
    assert [key for key in reference if not torch.equal(reference[key], resumed[key])] == []

    presses["count"] = 2
    monkeypatch.setattr(trainer, "batch_loss", ctrl_c_in_step_three)
    output = tmp_path / "twice"
    assert trainer.main(_args(checkpoint, dataset, output)) == 130
    message = capsys.readouterr().err
    assert "interrupted after step 2 of 6." in message
    assert f"Checkpoint: {output / 'checkpoints' / 'step-2'} (step 2, the last one saved)" in message
    assert sorted(path.name for path in (output / "checkpoints").iterdir()) == ["latest", "step-2"]


def test_ctrl_c_before_the_first_checkpoint_says_to_run_the_same_command(setup, tmp_path, monkeypatch, capsys):
    checkpoint, dataset, _ = setup

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "batch_loss", interrupted)
    arguments = _args(checkpoint, dataset, tmp_path / "out", "--resume-from", "auto")
    assert trainer.main(arguments) == 130
    message = capsys.readouterr().err
    assert "interrupted after step 0 of 6; no checkpoint was saved yet" in message
    command = shlex.split(message.split("Run the same command again:\n", 1)[1].strip().splitlines()[0])
    assert command[-len(arguments) + 2:] == arguments[:-2]  # the same arguments (an auto/latest resume dropped)


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    """The shared loop's guard: a NaN loss in step 3 stops the run with exit status 1, naming the step and the last
    good checkpoint (step-2); nothing of step 3 is applied and no reward is written."""
    checkpoint, dataset, _ = setup
    real_loss = trainer.batch_loss

    def nan_in_step_three(config, model, tokenizer, batch, step, *rest):
        loss, stats = real_loss(config, model, tokenizer, batch, step, *rest)
        return (loss * float("nan"), stats) if step == 2 else (loss, stats)

    monkeypatch.setattr(trainer, "batch_loss", nan_in_step_three)
    output = tmp_path / "nan"
    with pytest.raises(SystemExit) as error:
        trainer.main(_args(checkpoint, dataset, output))
    message = str(error.value.code)
    assert "The loss became nan at step 3" in message and "a lower --learning-rate" in message
    assert f"The last good checkpoint is kept in '{output / 'checkpoints' / 'step-2'}'" in message
    assert (output / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert not (output / "reward.safetensors").exists()


def test_label_format_and_cross_entropy(setup, tmp_path):
    checkpoint, _, labelled = setup
    path = trainer.run(_args(checkpoint, labelled, tmp_path / "ce", "--loss", "cross-entropy",
                              "--max-train-steps", "2", "--freeze-logit-scale"))
    with safe_open(str(path), "pt") as handle:
        training = json.loads(handle.metadata()["refinery.training"])
    assert training["loss"] == "cross-entropy" and training["train_logit_scale"] is False
    assert torch.equal(load_file(str(path))["logit_scale"], load_file(str(checkpoint))["logit_scale"])


def test_dataset_errors_are_listed_with_line_numbers_and_nothing_is_written(setup, tmp_path):
    checkpoint, dataset, _ = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    good = json.loads((dataset / "pairs.jsonl").read_text().splitlines()[0])
    absolute = {key: str(dataset / good[key]) for key in ("preferred", "rejected")}
    lines = [
        json.dumps({"prompt": good["prompt"], **absolute}),
        '{"prompt": "a red circle", "preferred": ',  # malformed JSON
        json.dumps({"prompt": "a red circle", "preferred": absolute["preferred"]}),  # no rejected
        json.dumps({"prompt": "a red circle", "preferred": "missing.png", "rejected": absolute["rejected"]}),
        "",
        json.dumps({"prompt": "a red circle", "image_0": absolute["preferred"], "image_1": absolute["rejected"],
                    "label": 0.5}),
    ]
    (bad / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    output = tmp_path / "never"
    with pytest.raises(SystemExit) as error:
        trainer.main(_args(checkpoint, bad, output))
    message = str(error.value)
    for expected in ("line 2: malformed JSON", "line 3: missing key(s) ['rejected']", "line 4: 'preferred' image "
                     "'missing.png' not found", "line 6: 'label' must be 0 or 1"):
        assert expected in message, message
    assert "line 1" not in message and "4 problem(s)" in message
    assert not output.exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--loss", "hinge"], "invalid choice: 'hinge'"),
        (["--max-train-steps", "0"], "--max-train-steps must be at least 1"),
        (["--crop-scale", "0.9", "0.5"], "--crop-scale needs 0 < LOW <= HIGH <= 1"),
        (["--augmentations", "0"], "needs --augmentations >= 1"),
        (["--lr-warmup-steps", "50"], "--lr-warmup-steps must be in [0, --max-train-steps = 6]"),
        (["--output-name", "a/b"], "--output-name must be a plain file name"),
    ],
)
def test_bad_flags_exit_with_usage(setup, tmp_path, capsys, extra, expected):
    checkpoint, dataset, _ = setup
    with pytest.raises(SystemExit) as error:
        trainer.main(_args(checkpoint, dataset, tmp_path / "out", *extra))
    assert error.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--trainable-image-layers", "9"], "--trainable-image-layers 9 is more than the 4 blocks"),
        (["--resume-from", "latest"], "no checkpoint pointer"),
        (["--resume-from", "nowhere/step-2"], "is not a folder"),
        (["--train-batch-size", "20"], "fewer than one batch"),
    ],
)
def test_unusable_setup_fails_before_writing(setup, tmp_path, extra, expected):
    checkpoint, dataset, _ = setup
    with pytest.raises(SystemExit) as error:
        trainer.main(_args(checkpoint, dataset, tmp_path / "out", *extra))
    assert expected in str(error.value)
    assert not (tmp_path / "out").exists()


def test_an_existing_reward_is_refused_unless_overwrite(setup, tmp_path):
    checkpoint, dataset, _ = setup
    output = tmp_path / "out"
    output.mkdir()
    (output / "reward.safetensors").write_bytes(b"keep me")
    with pytest.raises(SystemExit, match="already exists. Pass --overwrite"):
        trainer.main(_args(checkpoint, dataset, output, "--max-train-steps", "1"))
    assert (output / "reward.safetensors").read_bytes() == b"keep me"
    assert trainer.run(_args(checkpoint, dataset, output, "--max-train-steps", "2", "--overwrite")).stat().st_size > 100
