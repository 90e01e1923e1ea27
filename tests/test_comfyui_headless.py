"""``refinery-headless`` against a real ComfyUI server on loopback (the ``comfy_server`` fixture): uploads, overrides,
downloads, the texts and previews the workflows show, batch with concurrency and resume, and the errors users hit
(unreachable server, validation errors per node, a missing node type, an execution error)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from comfyui_refinery.headless.cli import main

pytestmark = pytest.mark.comfyui

TEST_MODELS = [
    "--set", "Load Checkpoint.ckpt_name=sd15-random.safetensors",
    "--set", "Load Quality CLIP.checkpoint=tiny-vit.safetensors",
    "--set", "Load Quality CLIP.architecture=auto",
    "--set", "G-Refine.total_steps=2",
    "--set", "G-Refine.prompt=a red circle next to a blue square",
]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    for index, colour in enumerate(((200, 30, 30), (30, 200, 30))):
        pixels = np.zeros((48, 64, 3), np.uint8)
        pixels[..., 2] = np.arange(64, dtype=np.uint8)[None] * 3
        pixels[10:30, 10:30] = colour
        Image.fromarray(pixels).save(folder / f"shot_{index}.png")
    (folder / "notes.txt").write_text("not a picture")
    return folder


def test_run_uploads_the_image_applies_overrides_and_downloads_outputs(comfy_server, pictures, tmp_path, capsys):
    output = tmp_path / "out"
    code = main(["run", "refine_image", "--server", comfy_server.url, "--image", str(pictures / "shot_0.png"),
                 *TEST_MODELS, "--set", "G-Refine.seed=5", "--output", str(output), "--quiet"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    files = sorted(output.rglob("*.png"))
    assert [f.parent.name for f in files] == ["refinery", "refinery"]  # refined + mask, in their subfolder
    with Image.open(next(f for f in files if f.name.startswith("refined"))) as refined:
        assert refined.size == (64, 48)
    assert str(output.resolve()) in printed.out and "done: 3 file(s)" in printed.out
    assert not list(output.rglob("*.tmp")), "downloads are renamed into place"
    summary = (output / "plan-summary.txt").read_text()  # G-Refine's summary, shown by the Plan Summary node
    assert summary.startswith("image 0: ") and "prompt: 'a red circle next to a blue square" in summary
    assert sorted(path.name for path in output.glob("*.txt")) == ["plan-summary.txt"], "the same text once"
    assert "Plan Summary (node 9" in printed.out and summary.splitlines()[0][:100] in printed.out


def test_run_saves_the_pq_heat_map_preview_and_every_text_of_refine_generated(comfy_server, tmp_path, capsys):
    output = tmp_path / "generated"
    code = main(["run", "refine_generated", "--server", comfy_server.url, *TEST_MODELS[:6],
                 "--set", "G-Refine Plan.total_steps=2", "--set", "Generate.steps=2",
                 "--set", "Empty Latent Image.width=64", "--set", "Empty Latent Image.height=64",
                 "--output", str(output), "--quiet"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert sorted(path.name for path in (output / "previews").iterdir()) == ["pq-heatmap.png"], \
        "the PreviewImage node's heat map; not the PQ-Map node's own copy of it"
    with Image.open(output / "previews" / "pq-heatmap.png") as heatmap:
        assert heatmap.size == (64, 64)
    assert sorted(path.name for path in output.glob("*.txt")) == ["aq-map.txt", "keep-better-table.txt",
                                                                   "plan-summary.txt"]  # Keep Better's table once
    assert (output / "keep-better-table.txt").read_text().startswith("| image | p before |")
    assert (output / "aq-map.txt").read_text().startswith("image 0: alignment score a = ")
    assert (output / "plan-summary.txt").read_text().startswith("image 0: ")
    assert "AQ-Map (node 11" in printed.out and "Plan Summary (node 21" in printed.out


def test_batch_of_images_with_concurrency_then_resume(comfy_server, pictures, tmp_path, capsys):
    output = tmp_path / "batch"
    arguments = ["batch", "refine_image", "--server", comfy_server.url, "--images", str(pictures), *TEST_MODELS,
                 "--concurrency", "2", "--output", str(output), "--quiet"]
    assert main(arguments) == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    assert "shot_0" in table and "shot_1" in table and "2 done, 0 failed, 0 skipped" in table
    for key in ("shot_0", "shot_1"):
        assert len(list((output / key).rglob("*.png"))) == 2
    state = json.loads((output / "headless-state.json").read_text())
    assert {key: entry["status"] for key, entry in state["items"].items()} == {"shot_0": "done", "shot_1": "done"}

    assert main(arguments) == 0  # resumed: nothing left to queue
    assert "0 done, 0 failed, 2 skipped" in capsys.readouterr().out


def test_batch_of_prompts_fills_the_text_widget(comfy_server, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red circle\n\na blue square\n")
    output = tmp_path / "prompts-out"
    code = main(["batch", "refine_image", "--server", comfy_server.url, "--prompts", str(prompts),
                 "--prompt-input", "G-Refine.prompt", *TEST_MODELS[:8], "--set", "Load Image.image=picture.png",
                 "--output", str(output), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir() if p.is_dir()) == ["prompt-0002", "prompt-0004"]


def test_validation_errors_name_each_node(comfy_server, tmp_path, capsys):
    code = main(["run", "refine_image", "--server", comfy_server.url, *TEST_MODELS, "--set", "G-Refine.total_steps=0",
                 "--set", "Load Image.image=picture.png", "--output", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "The server refused the workflow" in err and "node 5 (G-Refine)" in err and "total_steps" in err


def test_missing_node_type_names_the_pack(comfy_server, tmp_path, capsys):
    workflow = {"1": {"class_type": "RefineryNoSuchNode", "inputs": {}, "_meta": {"title": "Mystery"}},
                "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    path = tmp_path / "missing_api.json"
    path.write_text(json.dumps(workflow))
    assert main(["run", str(path), "--server", comfy_server.url, "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "'RefineryNoSuchNode'" in err and "is not installed on the server" in err and "ComfyUI-Refinery" in err


def test_execution_error_names_the_node_and_the_server_keeps_serving(comfy_server, pictures, tmp_path, capsys):
    code = main(["run", "refine_image", "--server", comfy_server.url, "--image", str(pictures / "shot_0.png"),
                 *TEST_MODELS, "--set", "Load Quality CLIP.surgery_depth=64", "--output", str(tmp_path / "a")])
    assert code == 1  # valid for the server (0..64), too deep for the test tower: fails when it runs
    err = capsys.readouterr().err
    assert "\nerror: Node 3 (Load Quality CLIP) failed: ValueError: surgery_depth must be in [1, " in err
    assert "got 64" in err
    code = main(["run", "refine_image", "--server", comfy_server.url, *TEST_MODELS, "--set", "G-Refine.seed=9",
                 "--set", "Load Image.image=picture.png", "--output", str(tmp_path / "b"), "--quiet"])
    assert code == 0, capsys.readouterr().err
