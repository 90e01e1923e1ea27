"""refinery-train-rankdpo on the committed tiny SD pipeline (benchmarks/toyworld/models/tiny-sd) and a tiny SDXL:
end-to-end runs, exact resume, the gradient direction of one step, the DPO reduction, and bad input."""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from comfyui_refinery.trainers.rankdpo import train as trainer
from comfyui_refinery.trainers.rankdpo.config import parse_args
from comfyui_refinery.trainers.rankdpo.data import RankedGroup, RankedGroupDataset, collate, read_groups
from tiny_models import TINY_SD, lora_deltas, randomize_lora, read_lora, torch_threads
from tiny_models import write_synpic_dataset as write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def run(arguments: list[str]) -> Path:
    return trainer.train(parse_args(arguments))


def base_arguments(dataset: Path, output: Path, *extra: str) -> list[str]:
    return ["--dataset", str(dataset), "--model", str(TINY_SD), "--output-dir", str(output), "--threads", "1",
            "--train-batch-size", "2", "--learning-rate", "1e-3", "--lr-warmup-steps", "0", *extra]


def first_batch(models, dataset: Path, groups: int = 2) -> dict:
    """The first ``groups`` prompt groups of ``dataset`` as one collated micro-batch at the model's resolution."""
    items = RankedGroupDataset(read_groups(dataset), models.resolution)
    return collate([items[index] for index in range(groups)])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """(dataset, LoRA path) of an uninterrupted 3-step run."""
    with torch_threads(1):
        folder = tmp_path_factory.mktemp("rankdpo")
        dataset = write_dataset(folder / "data")
        return dataset, run(base_arguments(dataset, folder / "straight", "--max-train-steps", "3",
                                           "--checkpointing-steps", "100"))


def test_two_steps_write_a_comfyui_lora_and_resume_is_exact(straight_run, tmp_path, monkeypatch):
    dataset, straight = straight_run
    tensors, metadata = read_lora(straight)
    assert straight.name == "rankdpo_lora.safetensors"
    assert tensors and all(key.startswith("lora_unet_") for key in tensors)
    assert metadata["refinery.method"] == "rankdpo" and metadata["refinery.base_family"] == "sd15"
    assert json.loads(metadata["refinery.training_args"])["loss"] == "rankdpo"
    assert metadata["refinery.rank"] == "8" and metadata["refinery.alpha"] == "8"
    assert any(value.abs().max() > 0 for key, value in tensors.items() if key.endswith("lora_up.weight"))
    assert (straight.parent / "training_config.json").is_file()

    # killed during step 3 (checkpoint at 2), resumed: the same weights bit for bit. --resume-from auto starts the
    # first run fresh (no checkpoint yet) and resumes the second from the latest checkpoint
    original = trainer.batch_loss

    def killed_at_step_three(config, models, batch, micro_index, *args):
        if micro_index == 2:
            raise KeyboardInterrupt
        return original(config, models, batch, micro_index, *args)

    monkeypatch.setattr(trainer, "batch_loss", killed_at_step_three)
    with pytest.raises(trainer.TrainingInterrupted) as interrupted:
        run(base_arguments(dataset, tmp_path / "resumed", "--max-train-steps", "3", "--checkpointing-steps", "2",
                           "--resume-from", "auto"))
    assert interrupted.value.step == 2 and interrupted.value.checkpoint.name == "step-2"
    assert not interrupted.value.saved_now  # a kill inside a step saves nothing: the last checkpoint is kept
    assert not (tmp_path / "resumed" / "rankdpo_lora.safetensors").exists()
    monkeypatch.setattr(trainer, "batch_loss", original)
    resumed = run(base_arguments(dataset, tmp_path / "resumed", "--max-train-steps", "3", "--checkpointing-steps",
                                 "2", "--resume-from", "auto"))
    resumed_tensors, _ = read_lora(resumed)
    assert sorted(resumed_tensors) == sorted(tensors)
    for key, value in tensors.items():
        assert torch.equal(resumed_tensors[key], value), key


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_the_printed_command_resumes_exactly(
        straight_run, tmp_path, monkeypatch, capsys):
    """The first Ctrl-C (a real SIGINT) during step 2 lets step 2 finish, saves checkpoint step-2 (none was due:
    --checkpointing-steps 100), exits with 130 and prints the command that resumes; that command gives the
    uninterrupted run's LoRA bit for bit."""
    dataset, straight = straight_run
    original = trainer.batch_loss

    def ctrl_c_during_step_two(config, models, batch, micro_index, *args):
        if micro_index == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(config, models, batch, micro_index, *args)

    monkeypatch.setattr(trainer, "batch_loss", ctrl_c_during_step_two)
    output = tmp_path / "out"
    assert trainer.main(base_arguments(dataset, output, "--max-train-steps", "3", "--checkpointing-steps", "100",
                                       "--resume-from", "auto")) == 130
    message = capsys.readouterr().err
    assert "Ctrl-C: finishing step 2 and saving a checkpoint" in message
    assert "refinery-train-rankdpo: interrupted after step 2 of 3." in message
    assert f"Checkpoint: {output / 'checkpoints' / 'step-2'} (step 2, saved now)" in message
    assert "Traceback" not in message and not (output / "rankdpo_lora.safetensors").exists()
    monkeypatch.setattr(trainer, "batch_loss", original)
    command = shlex.split(message.split("Resume with:\n", 1)[1].strip().splitlines()[0])
    arguments = command[command.index("-m") + 2:] if "-m" in command else command[1:]
    assert arguments[-2:] == ["--resume-from", "latest"] and arguments.count("--resume-from") == 1
    assert trainer.main(arguments) == 0
    resumed, reference = read_lora(output / "rankdpo_lora.safetensors")[0], read_lora(straight)[0]
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key


def test_one_step_lowers_the_preferred_images_score_and_leaves_the_reference_unchanged(tmp_path):
    """Gradient direction (issue): on a fixed batch and fixed (t, eps), one SGD step on the RankDPO loss lowers
    s(preferred) - s(rejected) for every group. beta 100 keeps every group's sigmoid out of saturation (at 2500 a
    group the first step already ordered carries almost no gradient, and the other group's step may move it either
    way). The reference is the same UNet with the LoRA off: training leaves its weights and its prediction
    unchanged, to the bit, while the policy's prediction moves."""
    dataset = write_dataset(tmp_path / "data", prompts=2, k=3)
    config = parse_args(base_arguments(dataset, tmp_path / "out", "--beta", "100"))
    torch.manual_seed(0)  # the LoRA's random down-projections
    models = trainer.load_models(config)
    batch = first_batch(models, dataset)
    device = torch.device("cpu")
    noisy = trainer.noisy_batch(models, batch, config.training.seed, 7, device)
    with torch.no_grad():
        reference_before = trainer.reference_prediction(models, noisy, batch["prompts"])
    base_weights = {name: parameter.detach().clone() for name, parameter in models.base_unet.named_parameters()
                    if "lora_" not in name}  # the reference's weights: everything but the LoRA
    parameters = [parameter for parameter in models.unet.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.05)
    # a first step moves the LoRA off B = 0, where every s is exactly 0
    loss, _ = trainer.batch_loss(config, models, batch, micro_index=7, device=device)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        before = trainer.batch_scores(models, batch, config.training.seed, 7, device).view(2, 3)
    loss, _ = trainer.batch_loss(config, models, batch, micro_index=7, device=device)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = trainer.batch_scores(models, batch, config.training.seed, 7, device).view(2, 3)
    margin_before = before[:, 0] - before[:, 2]  # best (phi 1) minus worst (phi 0)
    margin_after = after[:, 0] - after[:, 2]
    assert (margin_after < margin_before).all(), (margin_before, margin_after)

    with torch.no_grad():
        reference_after = trainer.reference_prediction(models, noisy, batch["prompts"])
        policy_after = trainer.policy_prediction(models, noisy)
    assert torch.equal(reference_after, reference_before)
    for name, parameter in models.base_unet.named_parameters():
        if name in base_weights:
            assert torch.equal(parameter, base_weights[name]), f"training changed the reference's {name}"
    assert (policy_after - reference_after).abs().max() > 1e-4  # the LoRA moved: the equality above is not vacuous


def test_same_draws_for_every_image_of_a_group(tmp_path):
    """Algorithm 2: one timestep t and one noise eps per prompt group, shared by all k images of the group (other
    groups draw their own), and the reference pass sees the very same UNet inputs (noisy latents, timesteps,
    conditioning) as the policy pass. The LoRA is random and non-zero, so the two passes are different functions
    and every score is non-zero (with B = 0 they are the same function: s = 0 whatever was drawn)."""
    dataset = write_dataset(tmp_path / "data", prompts=2, k=3)
    config = parse_args(base_arguments(dataset, tmp_path / "out"))
    models = trainer.load_models(config)
    randomize_lora(models.base_unet, std=0.02)
    batch = first_batch(models, dataset)
    device = torch.device("cpu")
    assert models.noise_scheduler.config.prediction_type == "epsilon"  # the target is eps itself
    noisy = trainer.noisy_batch(models, batch, 0, 0, device)
    assert noisy.group_index.tolist() == [0, 0, 0, 1, 1, 1]
    for rows in (slice(0, 3), slice(3, 6)):
        assert (noisy.timesteps[rows] == noisy.timesteps[rows][0]).all(), noisy.timesteps
        for image in range(1, 3):
            assert torch.equal(noisy.target[rows][image], noisy.target[rows][0])
    assert not torch.equal(noisy.target[0], noisy.target[3])  # each group draws its own eps

    unet_inputs = []
    hook = models.base_unet.register_forward_pre_hook(
        lambda module, args, kwargs: unet_inputs.append(args[:3]), with_kwargs=True)
    try:
        with torch.no_grad():
            scores = trainer.batch_scores(models, batch, 0, 0, device)
    finally:
        hook.remove()
    (policy_inputs, reference_inputs) = unet_inputs  # one policy pass, one reference pass
    assert torch.equal(policy_inputs[0], noisy.noisy) and torch.equal(policy_inputs[1], noisy.timesteps)
    for policy_input, reference_input in zip(policy_inputs, reference_inputs):
        assert torch.equal(policy_input, reference_input)
    assert scores.shape == (6,) and (scores.abs() > 0).all(), scores


def test_dpo_loss_trains_on_best_and_worst(tmp_path):
    group = RankedGroup("p", (Path("a"), Path("b"), Path("c"), Path("d")), (0.5, 1.0, 0.0, 1.0), 3)
    pair = group.best_and_worst()
    assert pair.images == (Path("b"), Path("c")) and pair.win_rates == (1.0, 0.0) and pair.line == 3
    dataset = write_dataset(tmp_path / "data", prompts=2, k=3)
    output = run(base_arguments(dataset, tmp_path / "dpo", "--loss", "dpo", "--max-train-steps", "1"))
    _, metadata = read_lora(output)
    assert metadata["refinery.method"] == "diffusion-dpo"


def test_text_encoder_lora_is_exported_and_loads_in_diffusers(tmp_path, monkeypatch):
    """--train-text-encoder: the file holds the text encoder's LoRA beside the UNet's, and diffusers'
    load_lora_weights applies exactly the trained adapter: per module the delta peft merges (scaling B A) of the
    trained text encoder, hence its text features, which differ from the base encoder's."""
    from comfyui_refinery.trainers.common.model_loading import load_sd_pipeline

    trained, load_models = [], trainer.load_models
    monkeypatch.setattr(trainer, "load_models", lambda config: trained.append(load_models(config)) or trained[-1])
    dataset = write_dataset(tmp_path / "data", prompts=2, k=2)
    output = run(base_arguments(dataset, tmp_path / "te", "--train-text-encoder", "--max-train-steps", "1",
                                "--output-name", "with_te"))
    tensors, _ = read_lora(output)
    assert any(key.startswith("lora_te_") for key in tensors) and any(key.startswith("lora_unet_") for key in tensors)
    text_encoder = trained[0].base_text_encoders[0]
    pipeline = load_sd_pipeline(TINY_SD)
    ids = pipeline.tokenizer(["a red circle number 0"], padding="max_length", truncation=True,
                             max_length=pipeline.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        base_features = pipeline.text_encoder(ids)[0]
    pipeline.load_lora_weights(str(output))

    expected, loaded = lora_deltas(text_encoder, "default"), lora_deltas(pipeline.text_encoder, "default_0")
    assert expected and set(loaded) == set(expected)
    for name in expected:
        torch.testing.assert_close(loaded[name], expected[name], rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        loaded_features, trained_features = pipeline.text_encoder(ids)[0], text_encoder.eval()(ids)[0]
    torch.testing.assert_close(loaded_features, trained_features, rtol=1e-5, atol=1e-6)
    assert (loaded_features - base_features).abs().max() > 1e-4  # the trained adapter changes the features


def test_tiny_sdxl_pipeline_trains(tmp_path):
    from test_diffusers_refiner import build_sdxl_pipeline

    from comfyui_refinery.benchmarks.toyworld.sd_pipeline import load_pipeline

    sdxl = build_sdxl_pipeline(load_pipeline().tokenizer)
    sdxl.save_pretrained(tmp_path / "sdxl")
    dataset = write_dataset(tmp_path / "data", prompts=2, k=3)
    arguments = base_arguments(dataset, tmp_path / "out", "--max-train-steps", "1")
    arguments[arguments.index("--model") + 1] = str(tmp_path / "sdxl")
    output = run(arguments)
    tensors, metadata = read_lora(output)
    assert metadata["refinery.base_family"] == "sdxl" and tensors


# ------------------------------------------------------------------------------------------------ bad input
def expect_exit(arguments: list[str], message: str, status: int = 1) -> str:
    """Run the console entry; it must exit with ``status`` and a message containing ``message``."""
    with pytest.raises(SystemExit) as caught:
        trainer.main(arguments)
    text = str(caught.value.code) if status == 1 else ""
    if status == 1:
        assert message in text, text
    else:
        assert caught.value.code == status
    return text


@pytest.mark.parametrize("flag, value, message", [
    ("--rank", "0", "--rank must be a positive integer"),
    ("--rank", "-4", "--rank must be a positive integer"),
    ("--beta", "0", "--beta must be a positive"),
    ("--beta", "-100", "--beta must be a positive"),
    ("--resolution", "60", "multiple of 8"),
    ("--lora-dropout", "1.5", "--lora-dropout"),
    ("--dcg-ranks", "phi", "--dcg-ranks"),
])
def test_bad_flags_exit_with_status_2(tmp_path, capsys, flag, value, message):
    dataset = write_dataset(tmp_path / "data", prompts=1, k=2)
    expect_exit(base_arguments(dataset, tmp_path / "out", flag, value), message, status=2)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dcg_ranks_flag_reaches_the_config(tmp_path):
    dataset = write_dataset(tmp_path / "data", prompts=1, k=2)
    assert trainer.parse_args(base_arguments(dataset, tmp_path / "out")).dcg_ranks == "model"
    assert trainer.parse_args(base_arguments(dataset, tmp_path / "out", "--dcg-ranks", "labels")).dcg_ranks == "labels"


def test_dataset_problems_are_listed_with_line_numbers_before_any_work(tmp_path):
    dataset = write_dataset(tmp_path / "data", prompts=3, k=2)
    lines = (dataset / "index.jsonl").read_text().splitlines()
    one_image = json.loads(lines[0])
    one_image["images"], one_image["win_rates"] = one_image["images"][:1], [1.0]
    missing = json.loads(lines[1])
    missing["images"][1] = "images/nowhere.png"
    bad_rate = json.loads(lines[2])
    bad_rate["win_rates"] = [1.5, 0.0]
    (dataset / "index.jsonl").write_text("\n".join([json.dumps(one_image), json.dumps(missing), json.dumps(bad_rate),
                                                    "{not json"]) + "\n")
    text = expect_exit(base_arguments(dataset, tmp_path / "out"), "4 problem(s)")
    assert "line 1: 'images' must list at least 2 image paths" in text
    assert "line 2: images[1] 'images/nowhere.png' not found" in text
    assert "line 3: win_rates[0] must be a number in [0, 1], got 1.5" in text
    assert "line 4: malformed JSON" in text
    assert not (tmp_path / "out").exists()


def test_all_tied_dataset_is_refused(tmp_path):
    dataset = write_dataset(tmp_path / "data", prompts=2, k=2)
    lines = [json.loads(line) for line in (dataset / "index.jsonl").read_text().splitlines()]
    for line in lines:
        line["win_rates"] = [0.5, 0.5]
    (dataset / "index.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    expect_exit(base_arguments(dataset, tmp_path / "out"), "no prompt with a preferred image")


def test_unsupported_model_family_is_named(tmp_path):
    from safetensors.torch import save_file

    dataset = write_dataset(tmp_path / "data", prompts=2, k=2)
    sd2 = tmp_path / "sd2.safetensors"  # an SD2.x-shaped UNet (context 1024), a few keys are enough to recognise it
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1024),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, str(sd2))
    arguments = base_arguments(dataset, tmp_path / "out")
    arguments[arguments.index("--model") + 1] = str(sd2)
    expect_exit(arguments, "Stable Diffusion 2.x")
    assert not (tmp_path / "out" / "rankdpo_lora.safetensors").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    dataset = write_dataset(tmp_path / "data", prompts=2, k=2)
    (tmp_path / "out").mkdir()
    existing = tmp_path / "out" / "rankdpo_lora.safetensors"
    existing.write_bytes(b"keep me")
    expect_exit(base_arguments(dataset, tmp_path / "out", "--max-train-steps", "1"), "--overwrite")
    assert existing.read_bytes() == b"keep me"
    run(base_arguments(dataset, tmp_path / "out", "--max-train-steps", "1", "--overwrite"))
    assert read_lora(existing)[0]


def test_unwritable_output_folder_is_refused_before_training(tmp_path, monkeypatch):
    dataset = write_dataset(tmp_path / "data", prompts=2, k=2)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    expect_exit(base_arguments(dataset, blocker / "out"), "Cannot write into --output-dir")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", disk_full)
    loaded = []
    monkeypatch.setattr(trainer, "load_models", lambda config: loaded.append(config))
    expect_exit(base_arguments(dataset, tmp_path / "full"), "No space left on device")
    assert loaded == []  # refused before the model was even loaded
    assert list((tmp_path / "full").iterdir()) == []
