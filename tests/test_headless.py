"""``refinery-headless`` without a server: argument, override and workflow errors, the unreachable-server path,
where each output of a finished prompt is saved, what the batch state keys an item by, and ``show``."""

from __future__ import annotations

import json
import shlex

import pytest

from ci import importorskip

importorskip("aiohttp")  # under CI a missing test dependency fails

from comfyui_refinery.headless.batch import BatchState, item_fingerprint, summary_table
from comfyui_refinery.headless.cli import main, parse_args
from comfyui_refinery.headless.client import HeadlessError
from comfyui_refinery.headless.outputs import end_nodes, plan_saves, text_excerpt
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
    state.record("a", status="done", fingerprint="f1", prompt_id="1", files=[str(tmp_path / "a.png")], error=None,
                 seconds=1.0)
    assert BatchState(tmp_path, "w").done("a", "f1") and not BatchState(tmp_path, "w").done("b", "f1")
    assert not BatchState(tmp_path, "w").done("a", "f2") and BatchState(tmp_path, "w").changed("a", "f2")
    table = summary_table([{"item": "a", **state.data["items"]["a"]},
                           {"item": "b", "status": "failed", "files": [], "error": "Node 5 failed", "seconds": 2.0}])
    assert "a.png" in table and "Node 5 failed" in table and "1 done, 1 failed, 0 skipped" in table
    (tmp_path / "headless-state.json").write_text("{broken")
    with pytest.raises(HeadlessError, match=r"headless-state\.json is damaged \(Expecting .*\): delete it to start the "
                                            r"batch over\."):
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


def test_fingerprint_follows_what_the_item_runs(tmp_path):
    graph = load_workflow("refine_image")
    picture = tmp_path / "a.png"
    picture.write_bytes(b"pixels")
    base = item_fingerprint(graph, picture)
    retitled = json.loads(json.dumps(graph))
    retitled["5"]["_meta"]["title"] = "Another title"
    reordered = {node_id: graph[node_id] for node_id in reversed(list(graph))}
    assert item_fingerprint(retitled, picture) == base == item_fingerprint(reordered, picture), \
        "titles and key order do not change what runs"
    assert item_fingerprint(apply_overrides(graph, [Override.parse("G-Refine.seed=7")]), picture) != base
    assert item_fingerprint(apply_overrides(graph, [Override.parse("G-Refine.cfg=7")]), picture) == base, "7 == 7.0"
    picture.write_bytes(b"other pixels")
    assert item_fingerprint(graph, picture) != base
    assert item_fingerprint(graph, None) != base


OUTPUTS = {  # /history outputs of refine_generated as ComfyUI 0.8 writes them (entries shortened)
    "10": {"images": [{"filename": "ComfyUI_temp_abcde_00001_.png", "subfolder": "", "type": "temp"}],
           "animated": [False]},
    "11": {"text": ["AQ report: fox 0.8"]},
    "12": {"text": ["plan: 1 region"]},
    "17": {"images": [{"filename": "refined_00001_.png", "subfolder": "refinery", "type": "output"}]},
    "19": {"images": [{"filename": "refine_mask_00001_.png", "subfolder": "../../etc", "type": "output"}]},
    "20": {"images": [{"filename": "ComfyUI_temp_abcde_00002_.png", "subfolder": "", "type": "temp"},
                      {"filename": "ComfyUI_temp_abcde_00003_.png", "subfolder": "", "type": "temp"}]},
    "21": {"text": ["plan: 1 region"]},
}


def test_saved_outputs_texts_once_and_the_previews_of_end_nodes():
    graph = load_workflow("refine_generated")
    assert {"7", "17", "19", "20", "21"} <= end_nodes(graph) and not {"10", "11", "12"} & end_nodes(graph)
    plan = plan_saves(OUTPUTS, graph)
    assert [(d.node_id, str(d.target)) for d in plan.downloads] == [
        ("17", "refinery/refined_00001_.png"), ("19", "etc/refine_mask_00001_.png"),
        ("20", "previews/pq-heatmap_1.png"), ("20", "previews/pq-heatmap_2.png")]
    assert [(t.node_id, str(t.target), t.text) for t in plan.texts] == [
        ("11", "aq-map.txt", "AQ report: fox 0.8"), ("21", "plan-summary.txt", "plan: 1 region")], \
        "the plan node's summary is saved once, named after the end node showing it"
    everything = plan_saves(OUTPUTS, graph, "all").downloads
    assert [str(d.target) for d in everything if d.node_id == "10"] == ["previews/pq-map.png"]
    assert all(d.entry["type"] == "output" for d in plan_saves(OUTPUTS, graph, "none").downloads)


def test_text_excerpt_cuts_long_texts():
    assert text_excerpt("a\nb\n") == "a\nb"
    long = "\n".join(f"line {n}" for n in range(20))
    assert text_excerpt(long, max_lines=3) == "line 0\nline 1\nline 2\n... (17 more line(s) in the file)"


def test_show_lists_workflows_and_their_settable_inputs(capsys):
    assert main(["show"]) == 0
    listed = capsys.readouterr().out
    assert "refine_image" in listed and "refine_image_api.json" in listed
    assert main(["show", "refine_image"]) == 0
    shown = capsys.readouterr().out
    assert "5  G-Refine (RefineryGRefine)" in shown and "seed = 42" in shown and "<- --image" in shown
    assert "images = " not in shown, "wired inputs are not listed"


def _documented_commands() -> list[list[str]]:
    """The example commands of ``refinery-headless --help`` (the cli docstring), as argument lists."""
    from comfyui_refinery.headless import cli

    text = cli.__doc__.replace("\\\n", " ")
    return [shlex.split(line.split("#")[0])[1:] for line in text.splitlines()
            if line.strip().startswith("refinery-headless ")]


def test_the_help_examples_address_nodes_and_inputs_the_shipped_workflows_have(tmp_path):
    commands = _documented_commands()
    assert len(commands) >= 4
    for arguments in commands:
        args = parse_args(arguments)
        if args.command == "show":
            continue
        graph = load_workflow(args.workflow)
        apply_overrides(graph, [Override.parse(text) for text in args.overrides])
        if getattr(args, "prompt_input", None):
            apply_overrides(graph, [Override.parse(f"{args.prompt_input}=a fox")])
