"""Every API-format workflow shipped in workflows/api/ queues and completes on a real ComfyUI server (``main.py
--cpu`` on loopback, the ``comfy_server`` fixture), with the test models substituted for the user's model files and
sizes and steps made small; the refiner workflows keep their invariants there; each UI-format workflow in workflows/
is generated from its API twin (``workflow_format.py``); the server lists exactly the UI workflows as the pack's
templates, each with its thumbnail."""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.comfyui

UI_DIR = Path(__file__).resolve().parents[1] / "workflows"
WORKFLOWS_DIR = UI_DIR / "api"
WORKFLOWS = sorted(WORKFLOWS_DIR.glob("*_api.json"))
TEST_VALUES = {  # input name -> value available in the test ComfyUI (conftest.py), or a small size / step count
    "checkpoint": "tiny-vit.safetensors",
    "architecture": "auto",
    "image": "picture.png",
    "ckpt_name": "sd15-random.safetensors",
    "width": 64,
    "height": 64,
    "steps": 2,
    "total_steps": 2,
    "model": "tiny-vit.safetensors",  # the reward loader's file (links elsewhere are skipped)
    "kind": "clip-score",
    "batch_size": 2,
}
EXPECTED = {  # every shipped workflow must be here: the features it covers
    "quality_maps_api": "PQ/AQ maps and the refine mask of a loaded image",
    "refine_generated_api": "generate -> maps -> plan -> masked stage -> global stage -> keep better -> save",
    "refine_image_api": "load image -> G-Refine (soft mask, keep-better guard) -> save",
    "refine_detailer_api": "load image -> G-Refine in detailer mode (small regions at native resolution) -> save",
    "select_best_api": "generate a batch -> score with a reward -> rank, keep the best -> save",
}


def with_test_models(graph: dict, **overrides) -> dict:
    """A copy of ``graph`` with TEST_VALUES (and ``overrides``, input name -> value) set on every node that has
    the input as a widget."""
    values = TEST_VALUES | overrides
    graph = json.loads(json.dumps(graph))
    for node in graph.values():
        for name, value in node["inputs"].items():
            if name in values and not isinstance(value, list):
                node["inputs"][name] = values[name]
    return graph


def load_workflow(stem: str, **overrides) -> dict:
    return with_test_models(json.loads((WORKFLOWS_DIR / f"{stem}.json").read_text()), **overrides)


def node_of(graph: dict, class_type: str, title: str | None = None) -> str:
    """The id of the graph's one node of ``class_type`` (and ``title``, where several share the type)."""
    (node_id,) = [node_id for node_id, node in graph.items() if node["class_type"] == class_type
                  and (title is None or node["_meta"]["title"] == title)]
    return node_id


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as picture:
        return np.asarray(picture.convert("RGB"))


def test_every_workflow_is_listed_with_its_feature():
    assert sorted(path.stem for path in WORKFLOWS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[path.stem for path in WORKFLOWS])
def test_api_workflow_runs_on_a_real_server(comfy_server, path):
    graph = with_test_models(json.loads(path.read_text()))
    run = comfy_server.run(graph)
    assert run.success, run.error_text()
    saved = [node_id for node_id, node in graph.items() if node["class_type"] == "SaveImage"]
    assert saved
    for node_id in saved:
        entries = run.outputs[node_id]["images"]
        assert entries, f"SaveImage {node_id} saved nothing"
        for entry in entries:
            assert pixels(comfy_server.download(entry)).ndim == 3
            assert (comfy_server.output_dir / entry["subfolder"] / entry["filename"]).is_file()


def add_half_masks(graph: dict) -> list:
    """Test nodes making a (2, 64, 64) perceptual map that is poor (0) on the left half of picture 0 and the top
    24 rows of picture 1, good (1) elsewhere: with random models the maps themselves come out flat."""
    graph["80"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    for node_id, (width, height) in (("81", (32, 64)), ("83", (64, 24))):
        graph[node_id] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": width, "height": height}}
        composite = str(int(node_id) + 1)
        graph[composite] = {"class_type": "MaskComposite", "inputs": {"destination": ["80", 0], "source": [node_id, 0],
                                                                      "x": 0, "y": 0, "operation": "multiply"}}
        graph[str(int(node_id) + 10)] = {"class_type": "MaskToImage", "inputs": {"mask": [composite, 0]}}
    graph["95"] = {"class_type": "ImageBatch", "inputs": {"image1": ["91", 0], "image2": ["93", 0]}}
    graph["96"] = {"class_type": "ImageToMask", "inputs": {"image": ["95", 0], "channel": "red"}}
    graph["97"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    return ["96", 0], ["97", 0]


def test_generated_workflow_keeps_each_latent_outside_its_own_mask(comfy_server):
    """Batch of 2 generated pictures, each with its own half mask (the plan's maps replaced by test masks): the
    stage-1 latent equals the encoded latent bit for bit outside each picture's own mask and differs inside
    (SaveLatent nodes added after VAEEncode and after stage 1); each picture has its own plan line."""
    graph = load_workflow("refine_generated_api", batch_size=2, min_area=0, dilation=0, seed=7)
    encode, stage1, plan = (node_of(graph, kind) for kind in ("VAEEncode", "RefineryMaskedRedenoise",
                                                               "RefineryRefinePlan"))
    graph[plan]["inputs"]["perceptual_map"], graph[plan]["inputs"]["alignment_map"] = add_half_masks(graph)
    graph["98"] = {"class_type": "SaveLatent", "inputs": {"samples": [encode, 0], "filename_prefix": "test/encoded"}}
    graph["99"] = {"class_type": "SaveLatent", "inputs": {"samples": [stage1, 0], "filename_prefix": "test/stage1"}}
    run = comfy_server.run(graph)
    assert run.success, run.error_text()

    from safetensors.torch import load as load_safetensors

    def latent(node_id):
        (entry,) = run.outputs[node_id]["latents"]
        return load_safetensors(comfy_server.download(entry))["latent_tensor"].float()

    before, after = latent("98"), latent("99")
    assert before.shape == after.shape == (2, 4, 8, 8)
    saves = {node["inputs"]["filename_prefix"]: node_id for node_id, node in graph.items()
             if node["class_type"] == "SaveImage"}
    masks = [pixels(comfy_server.download(entry))[..., 0] > 127
             for entry in run.outputs[saves["refinery/refine_mask"]]["images"]]
    assert [float(mask.mean()) for mask in masks] == [0.5, 24 / 64]
    for index, mask in enumerate(masks):
        cells = torch.from_numpy(mask).float().reshape(8, 8, 8, 8).amax(dim=(1, 3))  # (8, 8) latent cells
        keep = cells == 0
        assert torch.equal(after[index][:, keep], before[index][:, keep]), f"picture {index}"
        assert not torch.isclose(after[index][:, ~keep], before[index][:, ~keep]).all(dim=0).any(), f"picture {index}"
    summary = run.outputs[node_of(graph, "PreviewAny", "Plan Summary")]["text"][0]
    assert summary.count("\n") == 1 and summary.startswith("image 0: ") and "image 1: " in summary
    assert "on 50.0% of the pixels" in summary and "on 37.5% of the pixels" in summary
    table = run.outputs[node_of(graph, "PreviewAny", "Keep-Better Table")]["text"][0]
    assert table.count("\n") == 3 and table.count("| 0 |") + table.count("| 1 |") == 2  # one row per picture


@pytest.mark.parametrize("gated_untouched", [True, False])
def test_image_workflow_treats_a_picture_that_passes_the_gate_as_asked(comfy_server, gated_untouched):
    """gated_untouched on: the gated picture comes back bit-identical; off (the shipped default, as in the paper):
    it skips stage 1 and gets only the light stage 2."""
    graph = load_workflow("refine_image_api", perceptual_gate=0.0, alignment_gate=-1.0, gated_untouched=gated_untouched,
                          keep_better=False)  # the guard would return a picture the random model made worse
    run = comfy_server.run(graph)
    assert run.success, run.error_text()
    save = next(node_id for node_id, node in graph.items() if node["inputs"].get("filename_prefix") == "refinery/refined")
    (entry,) = run.outputs[save]["images"]
    original = np.asarray(Image.open(comfy_server.input_dir / "picture.png").convert("RGB"))
    summary = run.outputs[node_of(graph, "PreviewAny")]["text"][0]
    assert "passed the quality gate" in summary
    if gated_untouched:
        assert np.array_equal(pixels(comfy_server.download(entry)), original)
        assert "untouched" in summary
    else:
        assert not np.array_equal(pixels(comfy_server.download(entry)), original)
        assert "stage 1: skipped | stage 2: strength" in summary


def test_server_rejects_bad_prompts_clearly_and_keeps_serving(comfy_server):
    # validation: 0 steps is refused before anything runs, with the node and input named
    rejected = comfy_server.run(load_workflow("refine_image_api", total_steps=0))
    assert rejected.status == "rejected"
    refine = node_of(load_workflow("refine_image_api"), "RefineryGRefine")
    assert refine in rejected.node_errors and "total_steps" in rejected.error_text()
    # execution: a quality CLIP file that is no safetensors (random bytes) passes validation (it is listed) and fails
    # in its loader, which names the file
    broken = comfy_server.models_dir / "quality_clip" / "broken-workflow-test.safetensors"
    broken.write_bytes(bytes(range(256)) * 16)
    failed = comfy_server.run(load_workflow("refine_image_api", checkpoint=broken.name))
    assert failed.status == "error", failed.error_text()
    error = failed.execution_error()
    loader = node_of(load_workflow("refine_image_api"), "RefineryQualityModelLoader")
    assert error["node_id"] == loader and broken.name in error["exception_message"], error
    assert "not a readable safetensors" in error["exception_message"], error
    # the same server still runs a good prompt
    good = comfy_server.run(load_workflow("refine_image_api", seed=11))
    assert good.success, good.error_text()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[path.stem for path in WORKFLOWS])
def test_ui_workflow_has_the_same_nodes_as_the_api_one(comfy_harness, path):
    """workflows/<name>.json (drag into the browser) is generated from api/<name>_api.json and its layout in
    workflow_format.LAYOUTS; rewrite with REFINERY_WRITE_WORKFLOWS=1."""
    import os

    from workflow_format import LAYOUTS, api_to_ui

    import nodes

    name = path.name[: -len("_api.json")]
    expected = api_to_ui(json.loads(path.read_text()), nodes.NODE_CLASS_MAPPINGS, LAYOUTS[name])
    ui_path = UI_DIR / f"{name}.json"
    if os.environ.get("REFINERY_WRITE_WORKFLOWS") == "1":
        ui_path.write_text(json.dumps(expected, indent=2) + "\n")
    assert ui_path.is_file(), f"{ui_path.name} is missing: run with REFINERY_WRITE_WORKFLOWS=1"
    assert json.loads(ui_path.read_text()) == expected


def test_templates_are_the_ui_workflows_each_with_its_thumbnail(comfy_server):
    """ComfyUI lists every *.json directly in the pack's workflows/ as a template (Templates -> Extensions) and the
    frontend shows <name>.jpg beside it as the card's picture: only UI workflows are listed (API files live in
    workflows/api/, which the listing does not read), each loads as a UI graph and has a JPEG thumbnail (200)."""
    from comfyui_server import PACK_LINK_NAME

    listed = comfy_server.get_json("/api/workflow_templates")
    expected = sorted(path.name[: -len("_api.json")] for path in WORKFLOWS)
    assert sorted(listed.get(PACK_LINK_NAME, [])) == expected
    for name in expected:
        graph = comfy_server.get_json(f"/api/workflow_templates/{PACK_LINK_NAME}/{name}.json")
        assert {"nodes", "links", "version"} <= set(graph), f"{name}.json is not a UI-format workflow"
        with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/{PACK_LINK_NAME}/{name}.jpg") as answer:
            assert answer.status == 200, f"{name}.jpg: HTTP {answer.status}"
            thumbnail = answer.read()
        with Image.open(io.BytesIO(thumbnail)) as picture:
            assert picture.format == "JPEG" and picture.width >= 256 and picture.height >= 144, name
