"""Shared helpers of the benchmark scripts: thread limits, timing, step memory in a fresh process, and writing
results."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCHMARKS_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARKS_DIR / "results"
RESULTS_MD = BENCHMARKS_DIR / "RESULTS.md"


def limit_threads() -> int:
    """Use as many torch threads as cores (oversubscription on small machines is several times slower)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    return cores


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (Linux): VmRSS (resident now), VmHWM (peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def step_memory(step, device: torch.device) -> dict[str, float]:
    """Peak memory of one ``step()`` call. CUDA: ``max_memory_allocated`` (the caller warms up first, so lazy
    workspaces are not counted); CPU: the process's peak resident memory (VmHWM, reset to the current RSS with
    ``/proc/self/clear_refs`` just before). Returns peak_bytes, before_bytes, step_bytes (= peak - before), seconds,
    device_cuda (1.0 or 0.0)."""
    if device.type == "cuda":
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


def run_measurement(script: str, arguments: list[str]) -> dict[str, float]:
    """Run ``python <script> <arguments>`` in a fresh process (tqdm off) and return the JSON object its last
    stdout line prints (a script's one-measurement mode)."""
    output = subprocess.run([sys.executable, script, *arguments], check=True, capture_output=True, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"}).stdout
    return json.loads(output.strip().splitlines()[-1])


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


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that reproduces a run, as RESULTS.md records it: ``python benchmarks/<script>.py`` and the
    arguments ``argv`` (those of this process when None), shell-quoted."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benchmarks/{script}.py", *arguments])


def write_results(script: str, numbers: dict[str, float], summary: str, argv: list[str] | None = None) -> Path:
    """Write ``results/<script>.json`` (a flat object of named numbers) and append a line to RESULTS.md: the date,
    the command (:func:`command_line` of ``script`` and ``argv``) and ``summary``."""
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
