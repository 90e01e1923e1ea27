"""Packaging: the registry metadata in pyproject.toml is complete and agrees with requirements.txt, and the pack
loads in a real ComfyUI server as a *copy* (not the symlink the other server tests use) in a folder whose path has
spaces, next to another pack that has its own top-level modules named ``core`` and ``nodes``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    from ci import importorskip

    tomllib = importorskip("tomli")  # under CI a missing test dependency fails

PACK_ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())
OUR_NODES = {"RefineryQualityModelLoader", "RefineryPQMap", "RefineryAQMap", "RefineryRefineMask", "RefineryGRefine",
             "RefineryRewardModelLoader", "RefineryScoreImages", "RefineryRankImages", "RefineryRewardWinRate"}

OTHER_PACK_INIT = '''
from .core import greeting
from .nodes import OtherPackNode

NODE_CLASS_MAPPINGS = {"OtherPackNode": OtherPackNode}
'''
OTHER_PACK_NODES = '''
from ..core import greeting


class OtherPackNode:
    CATEGORY = "other"
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def run(self):
        return (greeting(),)
'''


def _requirement_names(lines) -> dict[str, str]:
    names = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-")
            names[name] = line.replace(" ", "")
    return names


def test_registry_metadata_is_complete_and_requirements_agree():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"] == "GPL-3.0-only" and (PACK_ROOT / "LICENSE").is_file()
    assert comfy["PublisherId"] and comfy["DisplayName"] == "ComfyUI-Refinery"
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith(".png")
    icon = comfy["Icon"].split("/main/", 1)[1]
    assert (PACK_ROOT / icon).is_file(), f"the icon {icon} is not in the repository"
    assert isinstance(comfy["includes"], list)
    requirements = _requirement_names((PACK_ROOT / "requirements.txt").read_text().splitlines())
    assert requirements == _requirement_names(project["dependencies"])


@pytest.mark.comfyui
def test_a_copy_in_a_path_with_spaces_loads_next_to_a_pack_with_core_and_nodes_modules(comfyui_dir, tmp_path):
    from comfyui_server import PACK_LINK_NAME, ComfyServer

    base = tmp_path / "Comfy UI base"
    server = ComfyServer(comfyui_dir, base, PACK_ROOT)
    (server.base_dir / "custom_nodes" / PACK_LINK_NAME).unlink()  # replace the symlink by a copy
    copy = server.base_dir / "custom_nodes" / "ComfyUI Refinery (copy)"
    shutil.copytree(PACK_ROOT, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "models",
                                                                      ".pytest_cache", "results"))
    other = server.base_dir / "custom_nodes" / "other-pack"
    (other / "core").mkdir(parents=True)
    (other / "nodes").mkdir()
    (other / "__init__.py").write_text(OTHER_PACK_INIT)
    (other / "core" / "__init__.py").write_text("def greeting():\n    return 'hello from the other core'\n")
    (other / "nodes" / "__init__.py").write_text(OTHER_PACK_NODES)
    server.start()
    try:
        types = server.node_types()
        log = server.log_tail(200_000)
    finally:
        server.stop()
    custom_lines = [line for line in log.splitlines() if "custom_nodes" in line and "seconds" in line]
    assert len(custom_lines) == 2 and not any("IMPORT FAILED" in line for line in custom_lines), log
    assert OUR_NODES <= types, sorted(OUR_NODES - types)
    assert "OtherPackNode" in types
