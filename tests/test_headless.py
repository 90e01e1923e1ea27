"""``refinery-headless`` without a server: argument, override and workflow errors, the unreachable-server path."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("aiohttp")

from comfyui_refinery.headless.batch import BatchState, summary_table
from comfyui_refinery.headless.cli import main
from comfyui_refinery.headless.workflow import Override, WorkflowError, apply_overrides, load_workflow

def test_override_values_are_json_when_they_can_be():
    assert Override.parse("KSampler.seed=7").value == 7
    assert Override.parse("5.cfg=7.5").value == 7.5
    assert Override.parse("G-Refine.gated_untouched=false").value is False
    assert Override.parse("Prompt.text=a red fox, (rock:1.2)").value == "a red fox, (rock:1.2)"
    assert Override.parse('Prompt.text="42"').value == "42"
    assert Override.parse("Node.with.dots.seed=1").node == "Node.with.dots"
    with pytest.raises(WorkflowError, match="<node title or id>.<input>=<value>"):
        Override.parse("seed=1")


def test_overrides_by_title_id_and_unique_class_type():
    graph = load_workflow("refine_image")
    changed = apply_overrides(graph, [Override.parse("G-Refine.seed=3"), Override.parse("1.image=x.png"),
                                      Override.parse("RefineryGRefine.cfg=2")])
    assert changed["5"]["inputs"]["seed"] == 3 and changed["1"]["inputs"]["image"] == "x.png"
    assert changed["5"]["inputs"]["cfg"] == 2 and graph["5"]["inputs"]["seed"] == 42, "the original is not changed"
    with pytest.raises(WorkflowError, match="names 2 nodes"):
        apply_overrides(graph, [Override.parse("SaveImage.filename_prefix=x")])
    with pytest.raises(WorkflowError, match="has no input 'steps'"):
        apply_overrides(graph, [Override.parse("G-Refine.steps=3")])


def test_state_file_and_summary(tmp_path):
    state = BatchState(tmp_path, "w")
    state.record("a", status="done", prompt_id="1", files=[str(tmp_path / "a.png")], error=None, seconds=1.0)
    assert BatchState(tmp_path, "w").done("a") and not BatchState(tmp_path, "w").done("b")
    table = summary_table([{"item": "a", **state.data["items"]["a"]},
                           {"item": "b", "status": "failed", "files": [], "error": "Node 5 failed", "seconds": 2.0}])
    assert "a.png" in table and "Node 5 failed" in table and "1 done, 1 failed, 0 skipped" in table
    (tmp_path / "headless-state.json").write_text("{broken")
    with pytest.raises(Exception, match="damaged"):
        BatchState(tmp_path, "w")


def test_unreachable_server_retries_then_says_what_to_do(capsys):
    code = main(["run", "refine_image", "--server", "http://127.0.0.1:9", "--retries", "2", "--backoff", "0.05"])
    assert code == 3
    err = capsys.readouterr().err
    assert "No ComfyUI server answered at http://127.0.0.1:9 after 2 tries" in err and "--server" in err


def test_bad_arguments_fail_before_contacting_a_server(tmp_path, capsys):
    assert main(["run", "refine_image", "--server", "http://127.0.0.1:9", "--set", "no-dot=1"]) == 2
    assert "'<node title or id>.<input>=<value>'" in capsys.readouterr().err
    assert main(["run", "refine_image", "--server", "http://127.0.0.1:9", "--set", "Nowhere.seed=1"]) == 2
    assert "No node 'Nowhere'" in capsys.readouterr().err
    assert main(["run", "refine_image", "--server", "http://127.0.0.1:9", "--set", "G-Refine.image=x"]) == 2
    assert "wired to node 1 (Load Image)" in capsys.readouterr().err
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    assert main(["run", str(ui), "--server", "http://127.0.0.1:9"]) == 2
    assert "UI-format workflow" in capsys.readouterr().err
