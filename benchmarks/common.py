"""Shared helpers of the benchmark scripts: thread limits and load, timing arms side by side, step memory in a fresh
process, the random SD1.5 both memory benchmarks train, targets written as met or MISSED, writing results, and the
toy-world preference evaluation shared by ``rankdpo_toyworld.py`` and ``rankdpo_diagnostics.py``.

Benchmarks import this module and ``comfyui_refinery.benchmarks.toyworld`` (shared metrics: ``measures.py``), never
each other."""

from __future__ import annotations

import datetime
import json
import operator
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from comfyui_refinery.benchmarks.toyworld import data

BENCHMARKS_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARKS_DIR / "results"
RESULTS_MD = BENCHMARKS_DIR / "RESULTS.md"


# -- threads and machine load ------------------------------------------------------------------------------------
def limit_threads(threads: int | None = None) -> int:
    """Set torch's threads to ``threads``, or when None to as many as cores (oversubscription on small machines is
    several times slower). Returns the number set."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def load_average() -> float:
    """The machine's 1-minute load average (what ``uptime`` prints first): other jobs' share of the cores, to state
    beside every timing; NaN where the platform has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# -- timing ------------------------------------------------------------------------------------------------------
def median_seconds(function, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``function()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(arms: dict[str, Callable[[], object]], repeats: int,
                               warmup: int = 1) -> dict[str, float]:
    """Median wall time of each arm, the arms timed side by side: ``warmup`` untimed rounds of every arm, then
    ``repeats`` rounds, each running every arm once, in the given order on even rounds and reversed on odd ones, so
    a background load that drifts during the run hits every arm alike. An arm on a GPU must synchronise before it
    returns. Returns arm name -> median seconds."""
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# -- step memory -------------------------------------------------------------------------------------------------
MALLOC_MMAP_THRESHOLD = 64 * 1024
"""Bytes; glibc's ``MALLOC_MMAP_THRESHOLD_`` in a memory measurement's process (:func:`run_measurement`)."""


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (Linux): VmRSS (resident now), VmHWM (peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def step_memory(step: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Memory of one ``step()`` call over what is allocated just before it (the loaded models).

    CUDA: one untimed warm-up ``step()`` first (cuDNN / cuBLAS workspaces are allocated lazily and kept), then
    ``torch.cuda.max_memory_allocated`` (peak of live tensors) and ``memory_allocated`` before the step.
    CPU (Linux): the process's resident memory, VmRSS before the step and the peak VmHWM during it (reset with
    ``/proc/self/clear_refs`` just before). No warm-up: run the step in a process started by :func:`run_measurement`,
    whose glibc returns every freed block of 64 KiB or more to the system, so the resident memory follows the live
    tensors. Measured on the random SD1.5 of :func:`random_sd15_models` (a RankDPO step at 256 px): a first step
    needs 1.70 GiB over the loaded models, a second 1.65 GiB (the 0.05 GiB are lazy one-time buffers, counted in
    every arm alike); with glibc's default, freed activations stayed resident and a second step appeared to need
    only 0.50 GiB. Limits of the CPU figure: resident pages, not tensors (the Python heap, and a block of which only
    some pages were touched, count as they are resident); another allocator (jemalloc, tcmalloc preloaded) ignores
    the setting.

    Returns peak_bytes, before_bytes, step_bytes (= peak - before), seconds (of the measured step), device_cuda
    (1.0 or 0.0).
    """
    if device.type == "cuda":
        step()  # warm-up: lazy workspaces are not the step's
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated()
    else:
        before = _status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        started = time.perf_counter()
        step()
        seconds = time.perf_counter() - started
        peak = _status_kib("VmHWM") * 1024
    return {"peak_bytes": float(peak), "before_bytes": float(before), "step_bytes": float(peak - before),
            "seconds": seconds, "device_cuda": float(device.type == "cuda")}


_MEASUREMENT_CODE = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[3]))
measure = getattr(importlib.import_module(sys.argv[2]), sys.argv[4])
print(json.dumps(measure(**json.loads(sys.argv[5]))))
"""


def run_measurement(script: str | os.PathLike, function: str, threads: int, **arguments) -> dict[str, float]:
    """Call ``function(**arguments)`` of the benchmark ``script`` (its path; the module is imported, its ``main`` not
    run) in a fresh Python process and return the dict it returns (JSON: numbers and strings). The process has
    ``threads`` torch threads, tqdm off, and glibc's mmap threshold fixed at :data:`MALLOC_MMAP_THRESHOLD`, so that
    freed blocks go back to the system (:func:`step_memory`): nothing an earlier measurement allocated or cached is
    counted or hidden."""
    script = Path(script).resolve()
    environment = {**os.environ, "TQDM_DISABLE": "1", "MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_THRESHOLD)}
    output = subprocess.run(
        [sys.executable, "-c", _MEASUREMENT_CODE, str(script.parent), script.stem, str(threads), function,
         json.dumps(arguments)], check=True, capture_output=True, text=True, env=environment).stdout
    return json.loads(output.strip().splitlines()[-1])


def random_sd15_models(resolution: int, lora_rank: int = 8, reference_copy: bool = False):
    """A randomly initialised full-size SD1.5 (the shipped diffusers configs of ``trainers/common/configs/sd15``:
    UNet 860 M, VAE, CLIP-L text encoder), frozen, with a LoRA of ``lora_rank`` on the UNet's attention projections
    (the trainers' default targets), as the trainers' ``TrainingModels`` on the CPU. Nothing is downloaded.

    reference_copy: also return a frozen copy of the UNet taken before the LoRA is added (the reference model of a
    two-UNet Diffusion-DPO step). Returns ``TrainingModels``, or ``(TrainingModels, reference UNet)``."""
    import copy

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from comfyui_refinery.trainers.common.lora import add_lora
    from comfyui_refinery.trainers.common.model_loading import diffusers_config_folder
    from comfyui_refinery.trainers.common.sd_models import TrainingModels

    folder = diffusers_config_folder("sd15")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    reference = copy.deepcopy(unet).eval() if reference_copy else None
    add_lora(unet, rank=lora_rank)
    models = TrainingModels(
        family="sd15", unet=unet, vae=vae.eval(), tokenizers=[CLIPTokenizer.from_pretrained(folder / "tokenizer")],
        text_encoders=[text_encoder.eval()], noise_scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"),
        resolution=resolution, trains_text_encoder=False)
    return (models, reference) if reference_copy else models


# -- targets and results -----------------------------------------------------------------------------------------
_COMPARISONS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def meets_target(value: float, comparison: str, threshold: float) -> bool:
    """Whether ``value <comparison> threshold`` holds (comparison one of <=, >=, <, >); NaN never meets a target."""
    if comparison not in _COMPARISONS:
        raise ValueError(f"comparison must be one of {sorted(_COMPARISONS)}, got {comparison!r}.")
    return _COMPARISONS[comparison](value, threshold)


def with_target(value: float, comparison: str, threshold: float, spec: str = ".3f") -> str:
    """A figure and its verdict for a RESULTS.md line: ``"1.010 (target <= 1.05: met)"``, or ``MISSED``."""
    verdict = "met" if meets_target(value, comparison, threshold) else "MISSED"
    return f"{format(value, spec)} (target {comparison} {threshold:g}: {verdict})"


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that reproduces a run, as RESULTS.md records it: ``python benchmarks/<script>.py`` and the
    arguments ``argv`` (those of this process when None), shell-quoted."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benchmarks/{script}.py", *arguments])


def write_results(script: str, numbers: dict[str, float | str], summary: str, argv: list[str] | None = None) -> Path:
    """Write ``results/<script>.json`` (a flat object of named numbers, and a few strings such as a device name) and
    append a line to RESULTS.md: the date, the command (:func:`command_line` of ``script`` and ``argv``) and
    ``summary``."""
    command = command_line(script, argv)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{script}.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(numbers, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
    if not RESULTS_MD.exists():
        RESULTS_MD.write_text("# Benchmark results\n\nOne line per run: date, command, summary.\n\n")
    with RESULTS_MD.open("a", encoding="utf-8") as handle:
        handle.write(f"- {datetime.date.today().isoformat()} `{command}`: {summary}\n")
    return path


def report(script: str, numbers: dict[str, float | str], summary: str, argv: list[str] | None,
           write: bool = True) -> dict[str, float | str]:
    """The end of every benchmark's ``main``: print ``summary``, and unless ``write`` is False (``--no-write``)
    :func:`write_results` of ``script``; returns ``numbers``."""
    print(summary)
    if write:
        write_results(script, numbers, summary, argv)
    return numbers


# -- toy-world preference evaluation (rankdpo_toyworld.py and rankdpo_diagnostics.py) ----------------------------
HELD_OUT_CAPTION_SEED = 202
"""Seed of the evaluation captions' draw (``rewards.single_object_captions``)."""
EVAL_NOISE_SEED = 303
"""Evaluation caption i is generated from generator seed ``EVAL_NOISE_SEED + i``, for the base and every LoRA."""
LOSSES = ("rankdpo", "dpo")
JUDGE = "attribute-judge"
SHIPPED_LORAS = data.MODELS_DIR / "loras"


def load_pipeline():
    """The shipped tiny-sd as a diffusers ``StableDiffusionPipeline`` (offline), progress bar off."""
    from comfyui_refinery.trainers.common.model_loading import load_sd_pipeline

    pipeline = load_sd_pipeline(data.TOY_SD_FOLDER)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def generate(pipeline, captions: list[str], seed: int, steps: int, guidance: float, batch_size: int = 32) -> torch.Tensor:
    """One picture per caption, caption i from the noise of generator seed ``seed + i``: (N, 64, 64, 3) in [0, 1]."""
    pictures = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + offset) for offset in range(len(chunk))]
        output = pipeline(chunk, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                          generator=generators, output_type="pt").images  # (b, 3, H, W) in [0, 1]
        pictures.append(output.permute(0, 2, 3, 1).float().clamp(0, 1))  # -> (b, H, W, 3)
    return torch.cat(pictures)


@torch.no_grad()
def score_all(reward_models: list, pictures: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
    """Every reward's scores of ``pictures`` (N, H, W, 3) for ``captions``: name -> (N,) on the CPU."""
    return {reward.name: reward.score(pictures, captions).float().cpu() for reward in reward_models}


def win_rate(tuned: torch.Tensor, base: torch.Tensor) -> float:
    """Fraction of items where ``tuned`` beats ``base`` (ties half)."""
    return float(((tuned > base).float() + 0.5 * (tuned == base).float()).mean())


def all_rewards() -> dict:
    """The four toy rewards by name (``benchmarks/toyworld/rewards.py``)."""
    from comfyui_refinery.benchmarks.toyworld import rewards

    return {reward.name: reward for reward in (rewards.toy_clip_score(), rewards.ToyAlignmentReward(),
                                               rewards.ToyQualityReward(), rewards.AttributeJudge())}
