"""API-format graph -> ComfyUI UI-format (LiteGraph, version 0.4) workflow, from the nodes' own definitions.

The UI file of each shipped workflow is generated from its API file with this, so both always hold the same nodes,
links and widget values (tests/test_comfyui_workflows.py checks it; set REFINERY_WRITE_WORKFLOWS=1 to rewrite).
"""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_WIDTH, ROW_HEIGHT = 380, 330


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _ordered_inputs(node_class) -> list[tuple[str, tuple]]:
    types = node_class.INPUT_TYPES()
    return [(name, spec) for group in ("required", "optional") for name, spec in types.get(group, {}).items()]


def _depths(graph: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            links = [value[0] for value in graph[node_id]["inputs"].values() if isinstance(value, list)]
            depth[node_id] = 1 + max((visit(str(link)) for link in links), default=-1)
        return depth[node_id]

    for node_id in graph:
        visit(node_id)
    return depth


def api_to_ui(graph: dict, node_classes: dict) -> dict:
    """graph: API format {id: {class_type, inputs, _meta}}; node_classes: ComfyUI's NODE_CLASS_MAPPINGS."""
    depths = _depths(graph)
    rows: dict[int, int] = {}
    links: list[list] = []
    nodes: list[dict] = []
    outputs_links: dict[tuple[str, int], list[int]] = {}
    for node_id in sorted(graph, key=int):
        node = graph[node_id]
        node_class = node_classes[node["class_type"]]
        inputs, widgets = [], []
        for slot_name, spec in _ordered_inputs(node_class):
            value = node["inputs"].get(slot_name)
            if _is_widget(spec) and not isinstance(value, list):
                if value is not None:
                    widgets.append(value)
                    if slot_name == "seed" or spec[1:] and spec[1].get("control_after_generate"):
                        widgets.append("fixed")
                    if spec[1:] and spec[1].get("image_upload"):
                        widgets.append("image")
                continue
            entry = {"name": slot_name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": None}
            if _is_widget(spec):  # a widget driven by a link
                entry["widget"] = {"name": slot_name}
            if isinstance(value, list):
                link_id = len(links) + 1
                source, slot = str(value[0]), int(value[1])
                source_class = node_classes[graph[source]["class_type"]]
                links.append([link_id, int(source), slot, int(node_id), len(inputs), source_class.RETURN_TYPES[slot]])
                outputs_links.setdefault((source, slot), []).append(link_id)
                entry["link"] = link_id
            inputs.append(entry)
        depth = depths[node_id]
        row = rows.get(depth, 0)
        rows[depth] = row + 1
        nodes.append({
            "id": int(node_id),
            "type": node["class_type"],
            "pos": [50 + depth * COLUMN_WIDTH, 50 + row * ROW_HEIGHT],
            "size": [340, 90 + 26 * (len(widgets) + len(inputs))],
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": inputs,
            "outputs": [],
            "title": node.get("_meta", {}).get("title"),
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets,
        })
    order = sorted(graph, key=lambda node_id: (depths[node_id], int(node_id)))
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
    return {
        "last_node_id": max(int(node_id) for node_id in graph),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }
