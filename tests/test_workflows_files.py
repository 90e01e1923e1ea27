"""The shipped workflow files, read as files (no ComfyUI needed): where each kind lives, that one prompt drives every
node that reads the prompt text, and that each UI workflow's note names every model file with its folder.

ComfyUI lists every ``*.json`` directly in a pack's ``workflows/`` folder as a template and shows ``<name>.jpg`` beside
it as its picture, so that folder holds only UI-format files, each with a thumbnail; the API-format twins (what
``POST /prompt`` and ``refinery-headless`` queue) live in ``workflows/api/``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
API_FILES = sorted((WORKFLOWS / "api").glob("*_api.json"))
NAMES = [path.name[: -len("_api.json")] for path in API_FILES]
PROMPT_SOURCES = {"PrimitiveString", "PrimitiveStringMultiline"}  # nodes whose "value" is the prompt text
PASS_THROUGH = {("RefineryAQMap", 2): "prompt"}  # (class, output slot) -> the input the output's text comes from
MODEL_FOLDERS = {  # (class_type, input) -> the ComfyUI folder the file goes into
    ("CheckpointLoaderSimple", "ckpt_name"): "models/checkpoints/",
    ("RefineryQualityModelLoader", "checkpoint"): "models/quality_clip/",
    ("RefineryQualityPromptsLoader", "prompts"): "models/quality_prompts/",
    ("RefineryRewardModelLoader", "model"): "models/reward_models/",
}


def api_graph(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}_api.json").read_text())


def test_workflows_folder_holds_only_ui_files_each_with_a_thumbnail_and_an_api_twin():
    listed = sorted(WORKFLOWS.glob("*.json"))  # what ComfyUI's /workflow_templates lists for the pack
    assert [path.stem for path in listed] == NAMES and NAMES
    for path in listed:
        graph = json.loads(path.read_text())
        assert isinstance(graph, dict) and {"nodes", "links"} <= set(graph), f"{path.name} is not a UI workflow"
        with Image.open(path.with_suffix(".jpg")) as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.width >= 256, path.with_suffix(".jpg").name
    for path in API_FILES:
        graph = json.loads(path.read_text())
        assert all("class_type" in node and "inputs" in node for node in graph.values()), path.name


def prompt_consumers(graph: dict) -> list[tuple[str, str]]:
    """(node id, input) of every input that reads the prompt text: each ``prompt`` input, and the ``text`` of each
    CLIPTextEncode that feeds a ``positive`` input."""
    positive = {str(value[0]) for node in graph.values() for name, value in node["inputs"].items()
                if name == "positive" and isinstance(value, list)}
    consumers = [(node_id, "prompt") for node_id, node in graph.items() if "prompt" in node["inputs"]]
    consumers += [(node_id, "text") for node_id in positive if graph[node_id]["class_type"] == "CLIPTextEncode"]
    return sorted(consumers)


def prompt_source(graph: dict, node_id: str, name: str) -> tuple[str, str]:
    """The (node id, input) holding the text that ``node_id``'s input ``name`` reads, following links."""
    value = graph[node_id]["inputs"][name]
    if not isinstance(value, list):
        return node_id, name
    source, slot = str(value[0]), int(value[1])
    kind = graph[source]["class_type"]
    if kind in PROMPT_SOURCES:
        return source, "value"
    if (kind, slot) in PASS_THROUGH:
        return prompt_source(graph, source, PASS_THROUGH[kind, slot])
    raise AssertionError(f"{node_id}.{name} reads its prompt from {kind} output {slot}, not a prompt text")


@pytest.mark.parametrize("name", NAMES)
def test_one_node_holds_the_prompt_every_prompt_reader_is_linked_to(name):
    """One override (``refinery-headless batch <name> --prompts ... --prompt-input 'Prompt.value'``, or the one box
    in the browser) changes the prompt of generation, maps, plan and ranking alike."""
    graph = api_graph(name)
    consumers = prompt_consumers(graph)
    assert consumers, "the workflow reads no prompt"
    sources = {prompt_source(graph, node_id, input_name) for node_id, input_name in consumers}
    assert len(sources) == 1, f"the prompt text comes from {len(sources)} places: {sorted(sources)}"
    (source, input_name), = sources
    assert isinstance(graph[source]["inputs"][input_name], str)
    if len(consumers) > 1:
        assert graph[source]["class_type"] in PROMPT_SOURCES and graph[source]["_meta"]["title"] == "Prompt"
        titled = [node_id for node_id, node in graph.items() if node.get("_meta", {}).get("title") == "Prompt"]
        assert titled == [source], "'Prompt' must name one node"


@pytest.mark.parametrize("name", NAMES)
def test_the_note_names_every_model_file_and_the_folder_it_goes_into(name):
    graph = api_graph(name)
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    notes = [node["widgets_values"][0] for node in ui["nodes"] if node["type"] in ("Note", "MarkdownNote")]
    assert len(notes) == 1, f"{name}.json has {len(notes)} notes; one should list the model files"
    note = notes[0]
    needed = [(node["inputs"][key], folder) for node in graph.values()
              for (kind, key), folder in MODEL_FOLDERS.items() if node["class_type"] == kind]
    assert needed
    for file_name, folder in needed:
        line = next((line for line in note.splitlines() if f"`{file_name}`" in line), None)
        assert line is not None and f"`{folder}`" in line, f"{file_name} -> {folder} is not in the note"
