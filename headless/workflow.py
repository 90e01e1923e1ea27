"""API-format workflows for the headless client: find them, check them, and apply ``--set`` overrides.

An API-format workflow is ``{node_id: {"class_type": str, "inputs": {name: value or [source_id, slot]},
"_meta": {"title": str}}}`` (ComfyUI's "Save (API)"). Overrides address a node by its id or its title.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

WORKFLOWS_DIR = Path(__file__).resolve().parent.parent / "workflows" / "api"  # the UI twins are in workflows/


class WorkflowError(ValueError):
    """A workflow file or an override that cannot be used, with what to do instead."""


@dataclass(frozen=True)
class Override:
    """``<node>.<input>=<value>``: node is a node id or title; value is parsed as JSON when it is a JSON literal
    (numbers, true/false, null, quoted strings, lists), else kept as text."""

    node: str
    input: str
    value: object
    text: str

    @classmethod
    def parse(cls, text: str) -> "Override":
        target, sep, raw = text.partition("=")
        node, dot, name = target.rpartition(".")
        if not sep or not dot or not node.strip() or not name.strip():
            raise WorkflowError(f"--set {text!r}: write it as '<node title or id>.<input>=<value>', e.g. "
                                f"'KSampler.seed=7' or '5.prompt=a red fox'.")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        return cls(node.strip(), name.strip(), value, text)


def shipped_workflows() -> dict[str, Path]:
    """The pack's API-format workflows: name (``refine_image``) -> path (``workflows/api/refine_image_api.json``)."""
    return {path.name[: -len("_api.json")]: path for path in sorted(WORKFLOWS_DIR.glob("*_api.json"))}


def resolve_workflow(name_or_path: str) -> Path:
    """A file path, or the name of a shipped workflow (``refine_image`` -> workflows/api/refine_image_api.json)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    for candidate in (WORKFLOWS_DIR / f"{name_or_path}_api.json", WORKFLOWS_DIR / name_or_path):
        if candidate.is_file():
            return candidate
    raise WorkflowError(f"No workflow file {name_or_path!r}: give the path of an API-format workflow JSON, or one of "
                        f"the shipped names {sorted(shipped_workflows())}.")


def load_workflow(name_or_path: str) -> dict:
    """The API-format graph of a file or shipped workflow, checked for shape (UI-format files are refused with the
    way to export the API format)."""
    path = resolve_workflow(name_or_path)
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise WorkflowError(f"{path} is not readable JSON ({error}).") from error
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise WorkflowError(f"{path} is a UI-format workflow (what the browser saves). Queueing needs the API format: "
                            f"in ComfyUI use Workflow -> Export (API), or the shipped twin in {WORKFLOWS_DIR}.")
    if not isinstance(graph, dict) or not graph or not all(
            isinstance(node, dict) and isinstance(node.get("class_type"), str) and isinstance(node.get("inputs"), dict)
            for node in graph.values()):
        raise WorkflowError(f"{path} is not an API-format workflow: expected {{node_id: {{'class_type': ..., "
                            f"'inputs': {{...}}}}}}.")
    return graph


def title_of(graph: dict, node_id: str) -> str:
    node = graph[node_id]
    return node.get("_meta", {}).get("title") or node["class_type"]


def find_node(graph: dict, reference: str) -> str:
    """The id of the node whose id, title or (when unique) class type is ``reference``."""
    if reference in graph:
        return reference
    for key in ("title", "class_type"):
        matches = [node_id for node_id, node in graph.items()
                   if (node.get("_meta", {}).get("title") if key == "title" else node["class_type"]) == reference]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            listed = ", ".join(f"{m} ({title_of(graph, m)})" for m in matches)
            raise WorkflowError(f"{reference!r} names {len(matches)} nodes ({listed}): use the node id.")
    known = ", ".join(f"{node_id} ({title_of(graph, node_id)})" for node_id in graph)
    raise WorkflowError(f"No node {reference!r} in the workflow. Nodes: {known}.")


def apply_overrides(graph: dict, overrides: list[Override]) -> dict:
    """A copy of ``graph`` with the overrides set. Setting an input that is wired to another node, or one the node
    does not have in the file, is refused (it would cut a link or be ignored by the server)."""
    graph = json.loads(json.dumps(graph))
    for override in overrides:
        node_id = find_node(graph, override.node)
        inputs = graph[node_id]["inputs"]
        if override.input not in inputs:
            raise WorkflowError(f"--set {override.text!r}: node {node_id} ({title_of(graph, node_id)}) has no input "
                                f"{override.input!r} in this workflow; its inputs: {sorted(inputs)}.")
        if isinstance(inputs[override.input], list):
            source = inputs[override.input][0]
            raise WorkflowError(f"--set {override.text!r}: {override.input!r} of node {node_id} is wired to node "
                                f"{source} ({title_of(graph, str(source))}); override that node's widget instead.")
        inputs[override.input] = override.value
    return graph


IMAGE_LOADERS = {"LoadImage": "image", "LoadImageMask": "image", "LoadImageOutput": "image"}


def image_inputs(graph: dict) -> list[tuple[str, str]]:
    """(node id, input name) of every image-loader widget (the inputs a local file is uploaded for)."""
    return [(node_id, IMAGE_LOADERS[node["class_type"]]) for node_id, node in graph.items()
            if node["class_type"] in IMAGE_LOADERS and not isinstance(node["inputs"].get("image"), list)]


def describe_workflow(name_or_path: str) -> str:
    """What ``refinery-headless show`` prints: the workflow's file, then each node (id, title, class type) and under
    it one line per widget value ``--set`` can change, marking the image inputs ``--image``/``--images`` fill."""
    path = resolve_workflow(name_or_path)
    graph = load_workflow(name_or_path)
    loaders = set(image_inputs(graph))
    lines = [f"{path}", "Nodes, with the inputs --set '<title or id>.<input>=<value>' can change (wired ones cannot):"]
    for node_id in sorted(graph, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n)):
        node = graph[node_id]
        lines.append(f"  {node_id}  {title_of(graph, node_id)} ({node['class_type']})")
        for name, value in node["inputs"].items():
            if not isinstance(value, list):
                filled = "   <- --image / --images" if (node_id, name) in loaders else ""
                lines.append(f"        {name} = {json.dumps(value, ensure_ascii=False)}{filled}")
    return "\n".join(lines)
