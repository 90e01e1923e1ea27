"""Every API-format workflow shipped in workflows/ queues and completes in a real ComfyUI, with the test models
substituted for the user's model files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*_api.json"))
TEST_VALUES = {  # input name -> value available in the test ComfyUI (conftest.py)
    "checkpoint": "tiny-vit.safetensors",
    "architecture": "auto",
    "image": "picture.png",
}


def with_test_models(graph: dict) -> dict:
    graph = json.loads(json.dumps(graph))
    for node in graph.values():
        for name, value in node["inputs"].items():
            if name in TEST_VALUES and not isinstance(value, list):
                node["inputs"][name] = TEST_VALUES[name]
    return graph


def test_workflows_exist():
    assert WORKFLOWS, "workflows/ has no *_api.json"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[path.stem for path in WORKFLOWS])
def test_api_workflow_runs(comfy_harness, path):
    graph = with_test_models(json.loads(path.read_text()))
    result = comfy_harness.run_graph(graph)
    assert result.success, result.error_text()
    saved = [node_id for node_id, node in graph.items() if node["class_type"] == "SaveImage"]
    assert saved and all(comfy_harness.output_files(result, node_id) for node_id in saved)
    for node_id in saved:
        assert all(file.is_file() for file in comfy_harness.output_files(result, node_id))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[path.stem for path in WORKFLOWS])
def test_ui_workflow_has_the_same_nodes_as_the_api_one(comfy_harness, path):
    """workflows/<name>.json (drag into the browser) is generated from <name>_api.json; rewrite with
    REFINERY_WRITE_WORKFLOWS=1."""
    import os

    import nodes

    from workflow_format import api_to_ui

    expected = api_to_ui(json.loads(path.read_text()), nodes.NODE_CLASS_MAPPINGS)
    ui_path = path.with_name(path.name.replace("_api.json", ".json"))
    if os.environ.get("REFINERY_WRITE_WORKFLOWS") == "1":
        ui_path.write_text(json.dumps(expected, indent=2) + "\n")
    assert ui_path.is_file(), f"{ui_path.name} is missing: run with REFINERY_WRITE_WORKFLOWS=1"
    assert json.loads(ui_path.read_text()) == expected
