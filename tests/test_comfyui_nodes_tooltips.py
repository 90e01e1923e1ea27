"""Every input of every Refinery node has a tooltip, as a live ComfyUI server (``main.py --cpu`` on loopback) sends
it to the browser in ``GET /object_info``: widgets and connection sockets (MODEL, IMAGE, REFINERY_QUALITY_CLIP ...)
alike. A tooltip that only repeats the input's name does not count."""

from __future__ import annotations

import pytest

from comfyui_harness import REFINERY_NODE_IDS

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def object_info(comfyui_dir, tmp_path_factory) -> dict:
    """/object_info of a bare server with the pack (no models needed: the schemas are the same without files)."""
    from comfyui_server import ComfyServer
    from conftest import PACK_ROOT

    server = ComfyServer(comfyui_dir, tmp_path_factory.mktemp("comfyui-tooltips"), PACK_ROOT)
    server.start(threads=1)
    try:
        return server.get_json("/object_info")
    finally:
        server.stop()


def inputs_of(info: dict) -> dict[str, dict]:
    """input name -> its options dict, over the required and optional inputs of one node's /object_info entry."""
    found = {}
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            found[name] = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return found


def test_every_input_of_every_refinery_node_has_a_tooltip(object_info):
    assert set(REFINERY_NODE_IDS) <= set(object_info), sorted(set(REFINERY_NODE_IDS) - set(object_info))
    missing, weak, total = [], [], 0
    for node_id in REFINERY_NODE_IDS:
        for name, options in inputs_of(object_info[node_id]).items():
            total += 1
            tooltip = str(options.get("tooltip") or "").strip()
            if not tooltip:
                missing.append(f"{node_id}.{name}")
            elif len(tooltip.split()) < 3 or tooltip.lower().rstrip(".") == name.replace("_", " ").lower():
                weak.append(f"{node_id}.{name}: {tooltip!r}")
    assert total >= 111, f"only {total} inputs listed: the node list or /object_info changed"
    assert not missing, f"{len(missing)} of {total} inputs lack a tooltip: {missing}"
    assert not weak, f"tooltips that do not say more than the name: {weak}"
