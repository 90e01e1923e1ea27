"""Shared helpers of the benchmark scripts: thread limits, timing, and writing results."""

from __future__ import annotations

import datetime
import json
import os
import statistics
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


def write_results(script: str, numbers: dict[str, float], command: str, summary: str) -> Path:
    """Write ``results/<script>.json`` (a flat object of named numbers) and append a line to RESULTS.md."""
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
