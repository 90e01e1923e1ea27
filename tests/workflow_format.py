"""API-format graph + layout -> ComfyUI UI-format (LiteGraph, version 0.4) workflow, from the nodes' own definitions.

The UI file of each shipped workflow (``workflows/<name>.json``, what ComfyUI lists as a template) is generated from
its API file (``workflows/api/<name>_api.json``) and its layout here, so both always hold the same nodes, links and
widget values (tests/test_comfyui_workflows.py checks it; set REFINERY_WRITE_WORKFLOWS=1 to rewrite). What the
frontend makes of the file is checked in the real frontend (tests/test_comfyui_frontend.py): ``graphToPrompt()`` of
the loaded UI file equals the API file, it opens at a readable zoom, and no node overlaps another after a run.

Widget values follow the frontend's rule: ``widgets_values`` holds one entry per widget of the node definition, in
definition order, linked or not (a linked widget keeps its default: the link overrides it), plus the frontend's extra
widgets (``control_after_generate`` after a seed; the upload button, whose value is ``"image"``, after LoadImage's
picture). Leaving linked widgets out
shifts every later value by one slot.

The layout stacks nodes in columns, columns in titled LiteGraph groups, groups in rows; a Markdown note lists the
model files the workflow needs and the folder each goes into. Heights are node body heights (the title bar, 30, is
drawn above ``pos``): image nodes get room for their preview, so nothing grows into a neighbour after a run.
"""

from __future__ import annotations

from dataclasses import dataclass

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: drawn above pos
BADGE_ROOM = 24  # the node source badge ("Refinery") sits above the title bar
GROUP_HEADER = 50  # a group's title bar (font 24) and a margin
MARGIN = 20  # inside a group, around its nodes
COLUMN_GAP = 50  # between columns of a group (links run there)
ROW_GAP = 20  # between stacked nodes, besides the title and the badge
GROUP_GAP = 60  # between groups
NOTE = "note"  # the layout's name for the model-file note
NOTE_ID = 100

MODEL_FILES = {  # (class_type, input) -> folder under ComfyUI/, what goes there
    ("CheckpointLoaderSimple", "ckpt_name"): ("models/checkpoints/", "your SD1.5 checkpoint"),
    ("RefineryQualityModelLoader", "checkpoint"): (
        "models/quality_clip/", "an open_clip ViT; OpenAI ViT-B/16 weights need architecture `ViT-B-16-quickgelu`"),
    ("RefineryQualityPromptsLoader", "prompts"): (
        "models/quality_prompts/", "the Q-Refine `PQ-*.pth` in a sub-folder, or a Refinery `.safetensors`"),
    ("RefineryRewardModelLoader", "model"): (
        "models/reward_models/", "HPSv2.1 weights, kind `auto`; a CLIPScore, PickScore or aesthetic model works too"),
    ("LoadImage", "image"): ("input/", "your picture (or upload one in the node)"),
}
TEXT_PROMPTS = "text prompts (any tower)"


@dataclass(frozen=True)
class Group:
    """A titled LiteGraph group of columns; each column a list of (node id or NOTE, body height)."""

    title: str
    columns: tuple[tuple[tuple[str, int], ...], ...]
    color: str = "#3f789e"
    width: int = 400  # of every node in it


@dataclass(frozen=True)
class Layout:
    rows: tuple[tuple[Group, ...], ...]
    scale: float  # the saved view (extra.ds) opens at this zoom with the graph's top left corner near the screen's
    screen_origin: tuple[int, int] = (90, 120)  # where the graph's top left lands on the screen (clear of the menus)


PREVIEW = 280  # room below the widgets for an image preview
MODELS, STAGE, MAPS, SAVE = "#b58b2a", "#3f789e", "#88A", "#8A8"  # LiteGraph's group colours: yellow, blue, pale blue, green

def g_refine_layout(refine_title: str) -> Layout:
    """load image -> one G-Refine node -> save (refine_image, refine_detailer: the same graph, other widgets)."""
    return Layout(rows=((
        Group("Models (see the note)", (((NOTE, 300), ("2", 100), ("3", 110), ("4", 60)),), color=MODELS),
        Group("1. Picture", ((("1", 100 + PREVIEW),),)),
        Group(refine_title, ((("5", 1000),),)),
        Group("3. Save", ((("6", 60 + PREVIEW), ("9", 220)), (("7", 30), ("8", 60 + PREVIEW))), color=SAVE),
    ),), scale=0.8)


LAYOUTS = {
    "quality_maps": Layout(rows=((
        Group("Models (see the note)", (((NOTE, 300), ("2", 110), ("3", 60)),), color=MODELS),
        Group("1. Picture", ((("1", 100 + PREVIEW),),)),
        Group("2. Quality maps", ((("4", 170 + PREVIEW), ("5", 230)),), color=MAPS),
        Group("3. Refine mask", ((("6", 150 + PREVIEW), ("7", 30)),), color=MAPS),
        Group("4. Save", ((("8", 60 + PREVIEW), ("9", 60 + PREVIEW)),), color=SAVE),
    ),), scale=0.85),
    "refine_generated": Layout(rows=(
        (
            Group("Models (see the note)", (((NOTE, 300), ("1", 100), ("8", 110), ("9", 60)),), color=MODELS),
            Group("1. Generate", ((("22", 150), ("2", 80), ("3", 150), ("4", 110)),
                                  (("5", 270), ("6", 50), ("7", 60 + PREVIEW)))),
            Group("2. Quality maps", ((("10", 170 + PREVIEW), ("11", 230)), (("20", 30 + PREVIEW),)), color=MAPS),
        ),
        (
            Group("3. G-Refine plan", ((("12", 490),), (("21", 220),)), color=MAPS),
            Group("4. Refine in two stages", ((("13", 50), ("14", 290)), (("15", 240), ("16", 50)))),
            Group("5. Keep better", ((("23", 250),), (("24", 220),)), color=MAPS),
            Group("6. Save", ((("17", 60 + PREVIEW),), (("18", 30), ("19", 60 + PREVIEW))), color=SAVE),
        ),
    ), scale=0.75),
    "refine_image": g_refine_layout("2. G-Refine: maps, plan, two stages"),
    "refine_detailer": g_refine_layout("2. G-Refine, detailer mode"),
    "select_best": Layout(rows=((
        Group("Models (see the note)", (((NOTE, 300), ("1", 100), ("7", 160)),), color=MODELS),
        Group("1. Generate a batch", ((("12", 150), ("2", 80), ("3", 150), ("4", 110)),
                                      (("5", 270), ("6", 50)))),
        Group("2. Score and rank", ((("8", 200), ("11", 220)),), color=MAPS),
        Group("3. Save", ((("9", 60 + PREVIEW), ("10", 60 + PREVIEW)),), color=SAVE),
    ),), scale=0.85),
}


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _ordered_inputs(node_class) -> list[tuple[str, tuple]]:
    types = node_class.INPUT_TYPES()
    return [(name, spec) for group in ("required", "optional") for name, spec in types.get(group, {}).items()]


def _default(spec):
    """The value a widget starts with in the frontend: its default, else the first option / zero / empty."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    if isinstance(spec[0], list):
        return spec[0][0] if spec[0] else None
    if spec[0] == "COMBO":
        return (options.get("options") or [None])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec[0]]


def _widget_values(slot_name: str, spec, value) -> list:
    """The widgets_values entries of one widget input: its value, then the frontend's extra widgets."""
    values = [value]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if slot_name in ("seed", "noise_seed") or options.get("control_after_generate"):
        values.append("fixed")
    if options.get("image_upload"):
        values.append("image")
    return values


def model_note(graph: dict) -> str:
    """Markdown: every model file (and picture) the graph names, with the ComfyUI folder it goes into."""
    lines = ["## Model files",
             "Put each file into the folder named here (under your ComfyUI folder), or pick yours in the node:", ""]
    for node_id in sorted(graph, key=int):
        node = graph[node_id]
        for (class_type, name), (folder, what) in MODEL_FILES.items():
            value = node["inputs"].get(name)
            if node["class_type"] != class_type or not isinstance(value, str):
                continue
            title = node.get("_meta", {}).get("title", class_type)
            if value == TEXT_PROMPTS:
                lines.append(f"- **{title}**: `{value}` needs no file; learned prompts go into `{folder}` ({what})")
            else:
                lines.append(f"- **{title}**: `{value}` into `{folder}` ({what})")
    lines += ["", "Nothing is downloaded. The groups run left to right, top to bottom."]
    return "\n".join(lines)


def _place(layout: Layout) -> tuple[dict[str, tuple[list, list]], list[dict]]:
    """{node id or NOTE: (pos, size)} and the groups (LiteGraph 0.4 group dicts)."""
    boxes: dict[str, tuple[list, list]] = {}
    groups: list[dict] = []
    top = 0
    for row in layout.rows:
        left, bottom = 0, top
        for group in row:
            x = left + MARGIN
            group_bottom = top
            for column in group.columns:
                y = top + GROUP_HEADER
                for item, height in column:
                    y += BADGE_ROOM + TITLE_HEIGHT
                    boxes[item] = ([x, y], [group.width, height])
                    y += height + ROW_GAP
                group_bottom = max(group_bottom, y - ROW_GAP + MARGIN)
                x += group.width + COLUMN_GAP
            right = x - COLUMN_GAP + MARGIN
            groups.append({"id": len(groups) + 1, "title": group.title,
                           "bounding": [left, top, right - left, group_bottom - top],
                           "color": group.color, "font_size": 24, "flags": {}})
            left = right + GROUP_GAP
            bottom = max(bottom, group_bottom)
        top = bottom + GROUP_GAP
    return boxes, groups


def api_to_ui(graph: dict, node_classes: dict, layout: Layout) -> dict:
    """graph: API format {id: {class_type, inputs, _meta}}; node_classes: ComfyUI's NODE_CLASS_MAPPINGS."""
    boxes, groups = _place(layout)
    missing = sorted(set(graph) - set(boxes), key=int)
    if missing:
        raise ValueError(f"the layout places no node {missing}")
    links: list[list] = []
    nodes: list[dict] = []
    outputs_links: dict[tuple[str, int], list[int]] = {}
    for node_id in sorted(graph, key=int):
        node = graph[node_id]
        node_class = node_classes[node["class_type"]]
        inputs, widgets = [], []
        for slot_name, spec in _ordered_inputs(node_class):
            value = node["inputs"].get(slot_name)
            linked = isinstance(value, list)
            if _is_widget(spec):
                widgets += _widget_values(slot_name, spec, _default(spec) if linked or value is None else value)
                if not linked:
                    continue
            entry = {"name": slot_name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": None}
            if _is_widget(spec):  # a widget driven by a link
                entry["widget"] = {"name": slot_name}
            if linked:
                link_id = len(links) + 1
                source, slot = str(value[0]), int(value[1])
                source_class = node_classes[graph[source]["class_type"]]
                links.append([link_id, int(source), slot, int(node_id), len(inputs), source_class.RETURN_TYPES[slot]])
                outputs_links.setdefault((source, slot), []).append(link_id)
                entry["link"] = link_id
            inputs.append(entry)
        pos, size = boxes[node_id]
        nodes.append({
            "id": int(node_id),
            "type": node["class_type"],
            "pos": pos,
            "size": size,
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": inputs,
            "outputs": [],
            "title": node.get("_meta", {}).get("title"),
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets,
        })
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            sources = [value[0] for value in graph[node_id]["inputs"].values() if isinstance(value, list)]
            depth[node_id] = 1 + max((visit(str(source)) for source in sources), default=-1)
        return depth[node_id]

    order = sorted(graph, key=lambda node_id: (visit(node_id), int(node_id)))
    for entry in nodes:
        node_id = str(entry["id"])
        node_class = node_classes[entry["type"]]
        names = getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES
        entry["order"] = order.index(node_id)
        entry["outputs"] = [
            {"name": name, "type": kind, "links": outputs_links.get((node_id, slot), []), "slot_index": slot}
            for slot, (name, kind) in enumerate(zip(names, node_class.RETURN_TYPES))
        ]
        if entry["title"] is None:
            del entry["title"]
    pos, size = boxes[NOTE]
    nodes.append({"id": NOTE_ID, "type": "MarkdownNote", "pos": pos, "size": size, "flags": {}, "order": len(nodes),
                  "mode": 0, "inputs": [], "outputs": [], "title": "Model files", "properties": {},
                  "widgets_values": [model_note(graph)], "color": "#432", "bgcolor": "#653"})
    scale = layout.scale
    offset = [round(layout.screen_origin[0] / scale, 1), round(layout.screen_origin[1] / scale, 1)]
    return {
        "last_node_id": max(NOTE_ID, *(int(node_id) for node_id in graph)),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"ds": {"scale": scale, "offset": offset}},
        "version": 0.4,
    }
