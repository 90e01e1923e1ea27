"""Benchmark helpers that decide what a result means: the command RESULTS.md records for a run; a missed target
written as MISSED; arms timed side by side in alternating order; results written only without --no-write; step
memory counted above what is loaded, in a fresh process that gives freed memory back (so a step after a warm-up
still shows its whole need); the random-direction LoRA of the RankDPO diagnostics (same keys, ranks, alphas; each
module's update a random rank-r matrix of a chosen multiple of the trained update's norm), and the RankDPO
benchmark's training captions for an evaluation on unseen captions."""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

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


@pytest.mark.parametrize(("value", "comparison", "threshold", "verdict"), [
    (1.01, "<=", 1.05, "met"), (1.07, "<=", 1.05, "MISSED"), (4.2, ">=", 4.0, "met"), (1.07, ">=", 4.0, "MISSED"),
    (1.0, ">", 1.0, "MISSED"), (math.nan, "<=", 1.05, "MISSED"), (math.nan, ">=", 30.0, "MISSED")])
def test_with_target_writes_a_missed_target_as_missed(value, comparison, threshold, verdict):
    text = common.with_target(value, comparison, threshold)
    assert text.endswith(f"(target {comparison} {threshold:g}: {verdict})")
    assert common.meets_target(value, comparison, threshold) == (verdict == "met")


def test_meets_target_refuses_an_unknown_comparison():
    with pytest.raises(ValueError, match="comparison must be one of"):
        common.meets_target(1.0, "=<", 1.05)


def test_interleaved_timing_runs_every_arm_each_round_in_alternating_order():
    calls = []
    arms = {name: (lambda name=name: calls.append(name)) for name in ("batched", "bare", "loop")}
    medians = common.interleaved_median_seconds(arms, repeats=3, warmup=1)
    forward, backward = ["batched", "bare", "loop"], ["loop", "bare", "batched"]
    assert calls == forward + forward + backward + forward  # warm-up round, then rounds 0, 1, 2
    assert set(medians) == set(arms) and all(seconds >= 0 for seconds in medians.values())


def test_report_writes_results_only_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(common, "RESULTS_MD", tmp_path / "RESULTS.md")
    numbers = {"ratio": 1.25, "gpu_device_name": "none"}
    assert common.report("demo_bench", numbers, "ratio 1.250", ["--repeats", "1"], write=False) is numbers
    assert not (tmp_path / "results").exists() and not (tmp_path / "RESULTS.md").exists()
    assert "ratio 1.250" in capsys.readouterr().out
    common.report("demo_bench", numbers, "ratio 1.250", ["--repeats", "1"], write=True)
    assert json.loads((tmp_path / "results" / "demo_bench.json").read_text()) == numbers
    line = (tmp_path / "RESULTS.md").read_text().splitlines()[-1]
    assert line.endswith("`python benchmarks/demo_bench.py --repeats 1`: ratio 1.250")


HAS_PROC_MEMORY = Path("/proc/self/clear_refs").exists()
MIB = 1024**2


@pytest.mark.needs(HAS_PROC_MEMORY, "CPU step memory reads /proc/self (Linux)")
def test_step_memory_counts_what_the_step_holds_above_the_loaded_state():
    loaded = torch.ones(32 * MIB // 4)  # 32 MiB held before and after: not the step's

    def holding_step():
        held = torch.ones(256 * MIB // 4)  # 256 MiB, touched
        del held

    figures = common.step_memory(holding_step, torch.device("cpu"))
    assert 0.9 * 256 * MIB <= figures["step_bytes"] <= 300 * MIB
    assert figures["step_bytes"] == figures["peak_bytes"] - figures["before_bytes"]
    assert figures["before_bytes"] > loaded.numel() * 4 and figures["device_cuda"] == 0.0
    assert common.step_memory(lambda: None, torch.device("cpu"))["step_bytes"] < 32 * MIB


MEASURED_MODULE = """
import os, sys
sys.path.insert(0, {benchmarks!r})
import torch
from common import step_memory

kept = []


def step():
    held = []
    for index in range(256):
        held.append(torch.ones(256 * 1024))  # 1 MiB blocks, touched
        if index % 16 == 0:
            kept.append(torch.ones(16))  # small blocks that outlive the step, between the large ones
    del held


def measure(warmups):
    for _ in range(warmups):
        step()
    figures = step_memory(step, torch.device("cpu"))
    return {{**figures, "pid": os.getpid(), "threads": torch.get_num_threads(),
            "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}}
"""


@pytest.mark.needs(HAS_PROC_MEMORY, "CPU step memory reads /proc/self (Linux)")
def test_run_measurement_gives_freed_memory_back_so_a_warmed_up_step_shows_its_whole_need(tmp_path):
    # With glibc's default, in about half the runs the blocks that two warm-up steps freed stayed resident and the
    # measured step reused them: it appeared to need 15-135 MiB of its 256 (2 threads). run_measurement's process
    # has a fixed mmap threshold, so freed blocks go back: 257 MiB in every run.
    script = tmp_path / "measured_bench.py"
    script.write_text(MEASURED_MODULE.format(benchmarks=str(Path(common.__file__).parent)))
    figures = common.run_measurement(script, "measure", 2, warmups=2)
    assert figures["pid"] != os.getpid() and figures["threads"] == 2
    assert figures["mmap_threshold"] == str(common.MALLOC_MMAP_THRESHOLD)
    assert figures["step_bytes"] >= 0.75 * 256 * MIB


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
