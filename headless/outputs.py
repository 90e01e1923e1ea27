"""What a finished prompt made, as ``GET /history/<id>`` lists it, and where the client saves each piece.

``outputs`` (ComfyUI 0.8 ``execution.py``: every node that returned a UI dict, cached ones included) is
``{node_id: ui}``, where ``ui`` holds
- file lists under ``OUTPUT_KEYS`` ("images", ...), each entry ``{"filename", "subfolder", "type"}`` with type
  ``"output"`` (SaveImage: kept in the server's output folder) or ``"temp"`` (previews: PreviewImage, PreviewMask,
  and nodes that preview their own result, like the pack's PQ-Map heat map and Refine Mask; the server deletes them
  when it restarts);
- text under ``"text"``: a list of str (PreviewAny "Preview as Text", the pack's plan summary, score tables and AQ
  report, which the nodes also return as STRING outputs).

Saved into the output folder (names relative to it):
- output files under the server's subfolder and name: ``refinery/refined_00001_.png``;
- previews as ``previews/<node title>.<ext>`` (``_<n>`` added for a batch, ``_node<id>`` when two nodes share a
  title). Which previews is the ``previews`` choice: ``"ends"`` (default) those of end nodes, the nodes whose outputs
  no other node reads (PreviewImage "PQ Heatmap" in refine_generated: the pictures the workflow shows);
  ``"all"`` also those intermediate nodes show of their own result (often the same picture again); ``"none"``;
- each distinct text once, as ``<node title>.txt`` (``plan-summary.txt``): when several nodes show the same text
  (G-Refine's summary and the PreviewAny node fed by it), the file is named after the end node.
A second run into the same folder replaces the preview and text files (output files get new numbers from the server).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

OUTPUT_KEYS = ("images", "gifs", "video", "audio", "latents", "files", "3d")
PREVIEW_CHOICES = ("ends", "all", "none")
PREVIEWS_FOLDER = "previews"


@dataclass(frozen=True)
class FileDownload:
    """entry: the /history file entry ({"filename", "subfolder", "type"}); target: where it goes, relative to the
    output folder; node_id: the node that made it."""

    entry: dict
    target: Path
    node_id: str


@dataclass(frozen=True)
class TextOutput:
    """A text a node showed (``text``), to be written to ``target`` (relative to the output folder)."""

    target: Path
    node_id: str
    title: str
    text: str


@dataclass(frozen=True)
class SavePlan:
    downloads: list[FileDownload]
    texts: list[TextOutput]


def end_nodes(graph: dict) -> set[str]:
    """Ids of the nodes of an API graph whose outputs no other node reads (links are ``[source_id, slot]``)."""
    read = {str(value[0]) for node in graph.values() for value in node["inputs"].values()
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)}
    return {node_id for node_id in graph if node_id not in read}


def node_title(graph: dict, node_id: str) -> str:
    """The node's title, else its class type; ``node <id>`` for a node the graph does not hold (expanded ones)."""
    node = graph.get(node_id)
    if node is None:
        return f"node {node_id}"
    return (node.get("_meta") or {}).get("title") or node["class_type"]


def file_stem(title: str) -> str:
    """A title as a file-name stem: ``"Plan Summary"`` -> ``"plan-summary"`` (letters, digits, ``._-`` kept)."""
    return re.sub(r"[^a-z0-9._-]+", "-", title.lower()).strip("-.") or "output"


def _graph_order(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _unique(folder: str, stem: str, suffix: str, node_id: str, taken: set[Path]) -> Path:
    """``folder/stem+suffix``, or with ``_node<id>`` (then a counter) added when that name is taken; marks it taken."""
    candidates = [f"{stem}{suffix}", f"{stem}_node{node_id}{suffix}"]
    candidates += [f"{stem}_node{node_id}_{n}{suffix}" for n in range(2, 10_000)]
    for name in candidates:
        path = Path(folder, name) if folder else Path(name)
        if path not in taken:
            taken.add(path)
            return path
    raise RuntimeError(f"no free file name for {stem}{suffix}")  # 10,000 files of one node: not reached


def _output_target(entry: dict) -> Path:
    """Server subfolder and file name, with any ``..`` or absolute part dropped (the server's answer is untrusted)."""
    parts = [part for part in Path(str(entry.get("subfolder") or "")).parts if part not in ("..", "/", "\\", "")]
    return Path(*parts, Path(str(entry["filename"])).name)


def _files(ui: dict) -> list[dict]:
    return [entry for key in OUTPUT_KEYS for entry in (ui.get(key) or [])
            if isinstance(entry, dict) and "filename" in entry]


def plan_downloads(outputs: dict, graph: dict, previews: str = "ends") -> list[FileDownload]:
    """Every output file, and the previews ``previews`` selects (see the module docstring), with their targets."""
    if previews not in PREVIEW_CHOICES:
        raise ValueError(f"previews must be one of {PREVIEW_CHOICES}, got {previews!r}")
    ends = end_nodes(graph)
    downloads, taken = [], set()
    for node_id in sorted(outputs, key=_graph_order):
        entries = _files(outputs[node_id] or {})
        temp = [entry for entry in entries if entry.get("type") == "temp"]
        for entry in entries:
            if entry.get("type") != "temp":
                target = _output_target(entry)
                taken.add(target)
                downloads.append(FileDownload(entry, target, node_id))
        if not temp or previews == "none" or (previews == "ends" and node_id not in ends):
            continue
        stem = file_stem(node_title(graph, node_id))
        for index, entry in enumerate(temp, 1):
            numbered = f"{stem}_{index}" if len(temp) > 1 else stem
            target = _unique(PREVIEWS_FOLDER, numbered, Path(str(entry["filename"])).suffix, node_id, taken)
            downloads.append(FileDownload(entry, target, node_id))
    return downloads


def plan_texts(outputs: dict, graph: dict, taken: set[Path] | None = None) -> list[TextOutput]:
    """Each distinct non-empty text of ``outputs`` once, named after an end node showing it when there is one, in
    graph order. ``taken``: relative paths already used (by the downloads), updated."""
    ends = end_nodes(graph)
    texts = {}  # node id -> its text (a node's list of strings joined by blank lines)
    for node_id, ui in outputs.items():
        entries = [str(item) for item in ((ui or {}).get("text") or []) if str(item).strip()]
        if entries:
            texts[node_id] = "\n\n".join(entries)
    chosen = {}  # text -> node id
    for node_id in sorted(texts, key=lambda n: (n not in ends, _graph_order(n))):
        chosen.setdefault(texts[node_id], node_id)
    taken = set() if taken is None else taken
    planned = []
    for node_id in sorted(chosen.values(), key=_graph_order):
        title = node_title(graph, node_id)
        target = _unique("", file_stem(title), ".txt", node_id, taken)
        planned.append(TextOutput(target, node_id, title, texts[node_id]))
    return planned


def plan_saves(outputs: dict, graph: dict, previews: str = "ends") -> SavePlan:
    """Where each file and text of a finished prompt's ``outputs`` goes (relative paths)."""
    downloads = plan_downloads(outputs, graph, previews)
    return SavePlan(downloads, plan_texts(outputs, graph, {download.target for download in downloads}))


def text_excerpt(text: str, max_lines: int = 12, max_width: int = 160) -> str:
    """``text`` when short, else its first ``max_lines`` lines (each cut at ``max_width``) and how many more."""
    lines = text.rstrip("\n").splitlines()
    shown = [line if len(line) <= max_width else line[: max_width - 3] + "..." for line in lines[:max_lines]]
    if len(lines) > max_lines:
        shown.append(f"... ({len(lines) - max_lines} more line(s) in the file)")
    return "\n".join(shown)
