"""refinery-train-focus-n-fix on the committed tiny SD pipeline (benchmarks/toyworld/models/tiny-sd): an end-to-end
run with exact resume, DRaFT-K's truncation (gradients only through the last K steps, only into the LoRA), the
regional constraint at work with a large beta, both region functions, and bad input."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_refinery.core import focus_n_fix
from comfyui_refinery.core.focus_n_fix import NotDifferentiableError
from comfyui_refinery.trainers.common.lora import lora_parameters
from comfyui_refinery.trainers.common.sd_models import load_models
from comfyui_refinery.trainers.focus_n_fix import train as trainer
from comfyui_refinery.trainers.focus_n_fix.config import parse_args
from tiny_models import TINY_SD, TOY_CLIP, TOY_MODELS, read_lora, torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a small red circle on a plain grey background", "a large blue square on a plain black background",
           "a small green star on a plain grey background", "a large red triangle on a plain black background"]


class RednessReward(torch.nn.Module):
    """A differentiable toy reward: minus the mean red excess of the picture (B,). Lower where pixels are red."""

    name = "toy-redness"
    uses_prompts = False

    def score(self, images, prompts=None, differentiable=False):
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            red = images[..., 0] - 0.5 * (images[..., 1] + images[..., 2])
            return -10 * torch.relu(red).mean(dim=(1, 2))


def write_prompts(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prompts.txt"
    path.write_text("# toy prompts\n" + "\n".join(PROMPTS) + "\n")
    return path


def arguments(prompts: Path, output: Path, *extra: str) -> list[str]:
    return ["--prompts", str(prompts), "--model", str(TINY_SD), "--reward", str(TOY_CLIP), "--reward-kind",
            "clip-score", "--output-dir", str(output), "--threads", "1", "--sampling-steps", "4", "--truncate-k", "2",
            "--guidance-scale", "3", "--train-batch-size", "2", "--learning-rate", "1e-3", "--lr-warmup-steps", "0",
            *extra]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """(prompts file, LoRA path) of an uninterrupted 3-step run."""
    with torch_threads(1):
        folder = tmp_path_factory.mktemp("fnf")
        prompts = write_prompts(folder)
        return prompts, trainer.train(parse_args(arguments(prompts, folder / "straight", "--max-train-steps", "3",
                                                           "--checkpointing-steps", "100")))


def test_a_run_writes_a_comfyui_lora_and_mask_samples_and_resume_is_exact(straight_run, tmp_path, monkeypatch):
    prompts, straight = straight_run
    tensors, metadata = read_lora(straight)
    assert straight.name == "focus_n_fix_lora.safetensors"
    assert tensors and all(key.startswith("lora_unet_") for key in tensors)
    assert metadata["refinery.method"] == "focus-n-fix" and metadata["refinery.base_family"] == "sd15"
    assert metadata["refinery.truncate_k"] == "2" and metadata["refinery.reward"] == "toy-clip"
    assert json.loads(metadata["refinery.training_args"])["region"] == "saliency"
    assert any(value.abs().max() > 0 for key, value in tensors.items() if key.endswith("lora_up.weight"))
    assert (straight.parent / "masks" / "step-000001.png").is_file()

    # killed during step 3 (checkpoint at 2), resumed: the same LoRA bit for bit. --resume-from auto starts the
    # first run fresh (no checkpoint yet) and resumes the second from the latest checkpoint
    original = trainer.training_step

    def killed_at_step_three(config, models, reward, region, prompts, micro_index, *args):
        if micro_index == 2:
            raise KeyboardInterrupt
        return original(config, models, reward, region, prompts, micro_index, *args)

    resumed_dir = tmp_path / "resumed"
    monkeypatch.setattr(trainer, "training_step", killed_at_step_three)
    with pytest.raises(trainer.TrainingInterrupted) as interrupted:
        trainer.train(parse_args(arguments(prompts, resumed_dir, "--max-train-steps", "3",
                                           "--checkpointing-steps", "2", "--resume-from", "auto")))
    assert interrupted.value.step == 2 and interrupted.value.checkpoint.name == "step-2"
    assert not (resumed_dir / "focus_n_fix_lora.safetensors").exists()
    monkeypatch.setattr(trainer, "training_step", original)
    resumed = trainer.train(parse_args(arguments(prompts, resumed_dir, "--max-train-steps", "3",
                                                 "--checkpointing-steps", "2", "--resume-from", "auto")))
    resumed_tensors, _ = read_lora(resumed)
    assert resumed_tensors.keys() == tensors.keys()
    for key in tensors:
        assert torch.equal(resumed_tensors[key], tensors[key]), key


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_resume_is_exact(straight_run, tmp_path, monkeypatch,
                                                                        capsys):
    """A real SIGINT during step 2: step 2 finishes, checkpoint step-2 is saved (none was due), exit status 130
    with the resume command; resuming gives the uninterrupted LoRA bit for bit."""
    prompts, straight = straight_run
    original = trainer.training_step

    def ctrl_c_during_step_two(config, models, reward, region, batch_prompts, micro_index, *args):
        if micro_index == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(config, models, reward, region, batch_prompts, micro_index, *args)

    monkeypatch.setattr(trainer, "training_step", ctrl_c_during_step_two)
    output = tmp_path / "out"
    command = arguments(prompts, output, "--max-train-steps", "3", "--checkpointing-steps", "100")
    assert trainer.main(command) == 130
    message = capsys.readouterr().err
    assert "refinery-train-focus-n-fix: interrupted after step 2 of 3." in message
    assert f"Checkpoint: {output / 'checkpoints' / 'step-2'} (step 2, saved now)" in message
    assert "--resume-from latest" in message and not (output / "focus_n_fix_lora.safetensors").exists()
    monkeypatch.setattr(trainer, "training_step", original)
    assert trainer.main(command + ["--resume-from", "latest"]) == 0
    resumed, reference = read_lora(output / "focus_n_fix_lora.safetensors")[0], read_lora(straight)[0]
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fnf-models")
    config = parse_args(arguments(write_prompts(folder), folder / "out", "--sampling-steps", "5",
                                  "--no-gradient-checkpointing"))
    torch.manual_seed(0)  # the LoRA's random down-projections
    return config, load_models(config)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("truncate_k", [1, 2, 4])
def test_gradients_flow_only_through_the_last_k_steps_and_only_into_the_lora(tiny_models, truncate_k):
    config, models = tiny_models
    config = type(config)(**{**config.__dict__, "truncate_k": truncate_k, "beta": 0.5})
    unet = models.base_unet
    calls = []
    handle = unet.register_forward_hook(lambda module, inputs, output: calls.append(torch.is_grad_enabled()))
    # one LoRA layer: how many times does gradient flow back through it?
    lora_layer = next(module for name, module in unet.named_modules() if name.endswith("to_q.lora_A.default"))
    backward_calls = []
    backward_handle = lora_layer.register_full_backward_hook(lambda *args: backward_calls.append(1))
    try:
        unet.zero_grad(set_to_none=True)
        result = trainer.training_step(config, models, trainer.reward_function(RednessReward()),
                                       lambda images, prompts: torch.ones(images.shape[:3]), PROMPTS[:2], 0,
                                       torch.device("cpu"))
        result.loss.backward()
    finally:
        handle.remove()
        backward_handle.remove()
    steps = config.sampling_steps
    # reference: every step without gradient; policy: N - K steps without, the last K with (one CFG-batched call each)
    assert calls == [False] * steps + [False] * (steps - truncate_k) + [True] * truncate_k
    assert len(backward_calls) == truncate_k
    trainable = set(map(id, lora_parameters(unet)))
    for name, parameter in unet.named_parameters():
        if id(parameter) in trainable:
            assert parameter.requires_grad, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
    lora_up = [parameter for name, parameter in unet.named_parameters() if "lora_B" in name]
    assert any(parameter.grad is not None and parameter.grad.abs().max() > 0 for parameter in lora_up)
    # the reference and the mask carry no graph
    assert not result.reference.requires_grad and not result.mask.requires_grad
    unet.zero_grad(set_to_none=True)


def test_a_large_beta_pulls_the_image_back_to_the_reference_outside_the_mask(tiny_models):
    """From a LoRA that moved the picture away from the base model's, gradient steps on J with a huge beta bring the
    picture back towards the reference outside the mask, step after step.

    Steps along the normalised gradient with the step length that maximises J among a few (a line search). The
    sampled picture is a very non-linear function of the LoRA (4 guided denoising steps): a step of 0.01 in
    parameter norm already overshoots, so the lengths tried are small. The constraint is a norm, not a squared
    norm, so its gradient keeps its size near I_hat = I_0 and a fixed-rate optimiser (SGD, Adam) would hover around
    the reference at a distance set by the rate."""
    config, models = tiny_models
    unet = models.base_unet
    initial = {name: parameter.detach().clone() for name, parameter in unet.named_parameters() if "lora_" in name}
    half_mask = torch.zeros(2, 64, 64)
    half_mask[:, :, :32] = 1  # the left half is "problematic"
    run_config = type(config)(**{**config.__dict__, "beta": 1e4, "sampling_steps": 4, "truncate_k": 4})
    parameters = lora_parameters(unet)

    def step_result():
        return trainer.training_step(run_config, models, trainer.reward_function(RednessReward()),
                                     lambda images, prompts: half_mask.clone(), PROMPTS[:2], 0, torch.device("cpu"))

    def outside(result) -> float:  # the constraint: ||(1 - M) (I_0 - I_hat)||_F, mean over the batch
        return result.stats["constraint"]

    try:
        with torch.no_grad():
            for name, parameter in unet.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.02 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
        result = step_result()
        distances = [outside(result)]
        for _ in range(4):
            unet.zero_grad(set_to_none=True)
            result.loss.backward()
            gradient = [parameter.grad.clone() for parameter in parameters]
            norm = torch.sqrt(sum(g.square().sum() for g in gradient))
            start = [parameter.detach().clone() for parameter in parameters]
            trials = []
            for length in (1e-2, 3e-3, 1e-3, 3e-4, 1e-4):
                with torch.no_grad():
                    for parameter, origin, g in zip(parameters, start, gradient):
                        parameter.copy_(origin - length * g / norm)
                    trial = step_result()
                trials.append((float(trial.loss), length))
            best = min(trials)[1]
            with torch.no_grad():
                for parameter, origin, g in zip(parameters, start, gradient):
                    parameter.copy_(origin - best * g / norm)
            result = step_result()
            distances.append(outside(result))
    finally:
        unet.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, parameter in unet.named_parameters():
                if name in initial:
                    parameter.copy_(initial[name])
    assert distances[0] > 0.1  # the perturbed LoRA moved the picture
    assert all(later < earlier for earlier, later in zip(distances, distances[1:])), distances
    assert distances[-1] < 0.93 * distances[0], distances


def toy_defect_pictures(seeds: list[int]) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Toy-world pictures with injected defects (benchmarks/toyworld/defects.py): images (N, 64, 64, 3) in [0, 1],
    their scene captions, and the exact ground-truth masks (N, 64, 64) bool of every defect."""
    from comfyui_refinery.benchmarks.toyworld import defects

    images, captions, masks = [], [], []
    for seed in seeds:
        image, caption, by_kind, _ = defects.make_example(seed, 64)
        images.append(torch.from_numpy(image).float() / 255)
        captions.append(caption)
        masks.append(torch.from_numpy(np.logical_or.reduce(list(by_kind.values()))))
    return torch.stack(images), captions, torch.stack(masks)


def test_quality_map_regions_and_the_region_flags(tmp_path):
    """--region quality-maps: the run records its region settings and writes mask samples, and its region function
    gives masks that follow the quality maps: on toy-world pictures with one perceptual defect (a colour cast, a
    blurred patch, a noise patch) each mask covers the defect and clearly less of the rest of the picture. An
    all-ones (or defect-blind) mask fails. --mask-threshold 0.9 because the tiny toy-clip's defect map 1 - P + A
    is high on most of a picture: at the default 0.3 these masks are full."""
    prompts = write_prompts(tmp_path)
    config = parse_args(arguments(prompts, tmp_path / "maps", "--max-train-steps", "1", "--region", "quality-maps",
                                  "--quality-clip", str(TOY_CLIP), "--quality-prompts",
                                  str(TOY_MODELS / "toy-quality-prompts.safetensors"), "--mask-samples", "2",
                                  "--mask-threshold", "0.9"))
    lora = trainer.train(config)
    _, metadata = read_lora(lora)
    args = json.loads(metadata["refinery.training_args"])
    assert args["region"] == "quality-maps" and args["region_settings"]["normalization"] == "none"
    assert args["region_settings"]["threshold"] == 0.9
    assert (tmp_path / "maps" / "masks" / "step-000001.png").is_file()

    from comfyui_refinery.benchmarks.toyworld.data import TEST_SEED_OFFSET

    images, captions, defects = toy_defect_pictures([TEST_SEED_OFFSET + offset for offset in (2, 3, 14)])
    region_function = trainer.make_region_function(config, None, torch.device("cpu"))
    masks, states = focus_n_fix.region_mask(region_function(images, captions), config.region_settings)
    for mask, defect, state in zip(masks.bool(), defects, states):
        covered_defect, covered_rest = mask[defect].float().mean(), mask[~defect].float().mean()
        assert state == "ok" and covered_defect > 0.95 and covered_rest < covered_defect - 0.25, (
            covered_defect, covered_rest)


def test_beta_zero_is_draft_and_masks_that_come_out_empty_or_full_warn_and_continue(tmp_path, caplog):
    prompts = write_prompts(tmp_path)
    config = parse_args(arguments(prompts, tmp_path / "empty", "--max-train-steps", "2", "--mask-samples", "0"))
    with caplog.at_level(logging.WARNING):
        trainer.train(config, reward=RednessReward(), region_function=lambda images, prompts: torch.zeros(
            images.shape[:3]))
    assert "masks are empty" in caplog.text and "covers the whole image" in caplog.text
    caplog.clear()
    config = parse_args(arguments(prompts, tmp_path / "full", "--max-train-steps", "1", "--region", "full"))
    with caplog.at_level(logging.WARNING):
        trainer.train(config, reward=RednessReward())
    assert "masks are full" in caplog.text and "plain DRaFT" in caplog.text
    draft = trainer.train(parse_args(arguments(prompts, tmp_path / "draft", "--max-train-steps", "1", "--beta", "0")),
                          reward=RednessReward())
    assert read_lora(draft)[1]["refinery.method"] == "draft-k"


def test_a_reward_without_gradient_is_refused_by_name_before_the_model_loads(tmp_path, monkeypatch):
    class Thresholded(RednessReward):
        name = "thresholded-redness"

        def score(self, images, prompts=None, differentiable=False):
            return (images[..., 0] > 0.5).float().mean(dim=(1, 2))

    monkeypatch.setattr(trainer, "load_models", lambda config: pytest.fail("the model was loaded"))
    config = parse_args(arguments(write_prompts(tmp_path), tmp_path / "out", "--max-train-steps", "1"))
    with pytest.raises(NotDifferentiableError, match="'thresholded-redness' is not differentiable"):
        trainer.train(config, reward=Thresholded())
    assert not (tmp_path / "out" / "focus_n_fix_lora.safetensors").exists()


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    class NanAtStepThree(RednessReward):
        calls = 0

        def score(self, images, prompts=None, differentiable=False):
            value = super().score(images, prompts, differentiable)
            if images.grad_fn is not None:  # a generated picture (not the saliency or differentiability probes)
                type(self).calls += 1
                if type(self).calls == 3:
                    return value * float("nan")
            return value

    output = tmp_path / "out"
    config = parse_args(arguments(write_prompts(tmp_path), output, "--max-train-steps", "4", "--checkpointing-steps",
                                  "2"))
    with pytest.raises(trainer.SetupError, match="at step 3") as error:
        trainer.train(config, reward=NanAtStepThree())
    assert "last good checkpoint" in str(error.value)
    assert (output / "checkpoints" / "step-2").is_dir()
    assert not (output / "focus_n_fix_lora.safetensors").exists()


@pytest.mark.parametrize("extra, message", [
    (["--truncate-k", "5"], "--truncate-k must be between 1 and --sampling-steps"),
    (["--truncate-k", "0"], "--truncate-k must be between 1"),
    (["--beta", "-1"], "--beta must be a finite number >= 0"),
    (["--region", "quality-maps"], "needs --quality-clip"),
    (["--mask-threshold", "2"], "threshold must be in"),
    (["--guidance-scale", "0.5"], "--guidance-scale must be >= 1"),
])
def test_bad_flags_exit_with_status_2_and_name_the_flag(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(arguments(write_prompts(tmp_path), tmp_path / "out", *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_existing_lora_is_refused_unless_overwrite(tmp_path):
    prompts = write_prompts(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "focus_n_fix_lora.safetensors").write_bytes(b"keep me")
    with pytest.raises(SystemExit, match="already exists"):
        trainer.main(arguments(prompts, tmp_path / "out", "--max-train-steps", "1"))
    assert (tmp_path / "out" / "focus_n_fix_lora.safetensors").read_bytes() == b"keep me"
