"""Benchmark helpers that decide what a result means: the command RESULTS.md records for a run, and the
random-direction LoRA of the RankDPO diagnostics (same keys, ranks, alphas; each module's update a random rank-r
matrix of a chosen multiple of the trained update's norm), and the RankDPO benchmark's training captions for an
evaluation on unseen captions."""

from __future__ import annotations

import shlex

import pytest
import torch
from safetensors.torch import load_file, save_file

from ci import importorskip

importorskip("diffusers")  # under CI a missing test dependency fails

from comfyui_refinery.benchmarks import common  # noqa: E402
from comfyui_refinery.benchmarks import rankdpo_diagnostics as diagnostics  # noqa: E402
from comfyui_refinery.benchmarks import rankdpo_toyworld as toyworld_benchmark  # noqa: E402
from comfyui_refinery.benchmarks.toyworld import rewards  # noqa: E402


def test_command_line_records_the_arguments_shell_quoted():
    command = common.command_line("rankdpo_toyworld", ["--steps", "100", "300", "--work-dir", "/tmp/a b"])
    assert command == "python benchmarks/rankdpo_toyworld.py --steps 100 300 --work-dir '/tmp/a b'"
    assert shlex.split(command)[-1] == "/tmp/a b"
    assert common.command_line("maps_speed", []) == "python benchmarks/maps_speed.py"


def _toy_lora(path):
    """Two modules in ComfyUI/kohya naming, rank 2, with a deliberate update ``up @ down``."""
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for name, (out_features, in_features) in {"lora_unet_a_to_q": (6, 5), "lora_unet_b_to_out_0": (4, 7)}.items():
        weights[f"{name}.lora_up.weight"] = torch.randn(out_features, 2, generator=generator)
        weights[f"{name}.lora_down.weight"] = torch.randn(2, in_features, generator=generator)
        weights[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(weights, str(path))
    return weights


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_random_direction_lora_keeps_the_layout_and_scales_each_update_norm(tmp_path, scale):
    trained = _toy_lora(tmp_path / "trained.safetensors")
    output = diagnostics.random_direction_lora(tmp_path / "trained.safetensors", tmp_path / "random.safetensors",
                                               seed=3, scale=scale)
    randomised = load_file(str(output))
    assert randomised.keys() == trained.keys()
    for key, value in trained.items():
        assert randomised[key].shape == value.shape
        if key.endswith(".alpha"):
            assert torch.equal(randomised[key], value)
    for name in ("lora_unet_a_to_q", "lora_unet_b_to_out_0"):
        trained_update = trained[f"{name}.lora_up.weight"] @ trained[f"{name}.lora_down.weight"]
        random_update = randomised[f"{name}.lora_up.weight"] @ randomised[f"{name}.lora_down.weight"]
        assert torch.linalg.matrix_norm(random_update).item() == pytest.approx(
            scale * torch.linalg.matrix_norm(trained_update).item(), rel=1e-5)
        cosine = torch.nn.functional.cosine_similarity(random_update.flatten(), trained_update.flatten(), dim=0)
        assert abs(cosine.item()) < 0.99  # a different direction, not the trained one rescaled


def test_random_direction_lora_is_deterministic_per_seed(tmp_path):
    _toy_lora(tmp_path / "trained.safetensors")
    first = load_file(str(diagnostics.random_direction_lora(tmp_path / "trained.safetensors", tmp_path / "1.safetensors", 7)))
    again = load_file(str(diagnostics.random_direction_lora(tmp_path / "trained.safetensors", tmp_path / "2.safetensors", 7)))
    other = load_file(str(diagnostics.random_direction_lora(tmp_path / "trained.safetensors", tmp_path / "3.safetensors", 8)))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["lora_unet_a_to_q.lora_up.weight"], other["lora_unet_a_to_q.lora_up.weight"])


def test_training_captions_for_unseen_evaluation_avoid_every_evaluation_caption():
    evaluation = set(rewards.single_object_captions(48, toyworld_benchmark.HELD_OUT_CAPTION_SEED))
    overlapping = toyworld_benchmark.training_captions(192, set())
    assert overlapping == rewards.single_object_captions(192, toyworld_benchmark.TRAIN_CAPTION_SEED)
    assert set(overlapping) & evaluation  # the default draw shares captions with the evaluation
    unseen = toyworld_benchmark.training_captions(192, evaluation)
    assert len(unseen) == 192 and not set(unseen) & evaluation
    assert unseen == toyworld_benchmark.training_captions(192, evaluation)  # deterministic
    everything = set(rewards.single_object_captions(2000, toyworld_benchmark.TRAIN_CAPTION_SEED))
    with pytest.raises(ValueError, match="--eval-captions overlapping"):
        toyworld_benchmark.training_captions(10, everything)
