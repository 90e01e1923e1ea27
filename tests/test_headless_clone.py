"""``refinery-headless`` from a plain clone of the pack, as the README's ComfyUI install leaves it (cloned into
``custom_nodes/ComfyUI-Refinery``, nothing pip-installed): ``python <clone>/headless/__main__.py`` from any folder
and ``python -m headless`` from the clone's folder run the command from the clone's own files; ``python -m
comfyui_refinery.headless`` runs the installed pack.

The clone is a copy of this working tree without .git and build leftovers (a ``git clone`` would miss uncommitted
files); each command runs in a fresh Python process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ci import importorskip

importorskip("aiohttp")  # under CI a missing test dependency fails

PACK_ROOT = Path(__file__).resolve().parent.parent
LEFTOVERS = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", "build", "dist")


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A copy of the pack at ``<tmp>/ComfyUI/custom_nodes/ComfyUI-Refinery`` (a folder name Python cannot import)."""
    target = tmp_path_factory.mktemp("comfyui") / "custom_nodes" / "ComfyUI-Refinery"
    shutil.copytree(PACK_ROOT, target, ignore=LEFTOVERS)
    return target


def run(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([sys.executable, *arguments], cwd=cwd, env=environment, capture_output=True, text=True,
                          check=False, timeout=120)


def test_the_clone_runs_as_a_file_from_any_folder(clone, tmp_path):
    script = clone / "headless" / "__main__.py"
    helped = run([str(script), "--help"], cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: refinery-headless") and "run" in helped.stdout and "batch" in helped.stdout
    listed = run([str(script), "show"], cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert str(clone / "workflows" / "api" / "refine_image_api.json") in listed.stdout, \
        "the clone's own files run, not an installed copy"


def test_the_clone_runs_as_a_module_from_its_folder(clone):
    shown = run(["-m", "headless", "show", "refine_image"], cwd=clone)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(str(clone / "workflows" / "api" / "refine_image_api.json"))
    assert "G-Refine (RefineryGRefine)" in shown.stdout


def test_a_bad_command_through_the_clone_says_what_is_wrong(clone, tmp_path):
    refused = run([str(clone / "headless" / "__main__.py"), "run", "refine_image", "--set", "seed=1"], cwd=tmp_path)
    assert refused.returncode == 2 and "'<node title or id>.<input>=<value>'" in refused.stderr


def test_a_python_without_aiohttp_is_told_how_to_get_it(clone, tmp_path):
    bare = run(["-S", str(clone / "headless" / "__main__.py"), "--help"], cwd=tmp_path)  # -S: no site-packages
    assert bare.returncode == 2
    assert "refinery-headless needs aiohttp" in bare.stderr and "-m pip install aiohttp" in bare.stderr


def test_the_installed_pack_runs_as_a_module(tmp_path):
    helped = run(["-m", "comfyui_refinery.headless", "--help"], cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: refinery-headless")
