"""Every UI-format workflow of ``workflows/`` in the real ComfyUI frontend (the ``comfyui-frontend-package`` ComfyUI 0.8
serves) in headless Chromium: Debian's ``chromium`` driven by Playwright (no browser download, ``executable_path``),
with the frontend's default settings (only the first-run dialog is switched off).

- What the user queues is the API twin: ``app.graphToPrompt()`` of the loaded UI file holds the same nodes, titles,
  widget values and links as ``workflows/api/<name>_api.json`` (a UI file whose widget values sit in the wrong slots
  loads without complaint, so the file's own ``widgets_values`` prove nothing).
- It opens readable: at the zoom the file saves (``extra.ds``), above the frontend's low-detail threshold, its first
  group on the screen, every node in a titled group, no node or group over another.
- It runs from the frontend (the test models put in its loaders, small sizes and steps) and, once every preview is
  shown, still no node overlaps another.

Screenshots of the workflows as they open (a 2560 x 1440 window) are saved into ``$REFINERY_SCREENSHOTS`` when set,
else into the test's temporary folder, beside a screenshot after the run; ``REFINERY_SCREENSHOTS=docs/screenshots``
refreshes the README's pictures and the template thumbnails (``workflows/<name>.jpg``: the graph's part of the same
screenshot, on a square).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from ci import importorskip, skip_or_fail

pytestmark = pytest.mark.comfyui

PACK_ROOT = Path(__file__).resolve().parent.parent
UI_WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))
API_DIR = PACK_ROOT / "workflows" / "api"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
VIEWPORT = {"width": 2560, "height": 1440}
READABLE_SCALE = 0.7  # 14 px node text at >= 10 px; the frontend draws empty boxes below 8 / 14 = 0.57
THUMBNAIL_SIZE = 512
RUN_VALUES = {  # widget name -> what the test ComfyUI has (conftest.py's comfy_server), or a small size / step count
    "checkpoint": "tiny-vit.safetensors", "architecture": "auto", "image": "picture.png",
    "ckpt_name": "sd15-random.safetensors", "width": 64, "height": 64, "steps": 2, "total_steps": 2,
    "model": "tiny-vit.safetensors", "kind": "clip-score", "batch_size": 2,
}
NODE_BOXES = """() => {
    const nodes = window.app.graph._nodes.map(node => ({
        id: node.id, type: node.type, title: node.title, imgs: node.imgs?.length ?? 0,
        rect: [node.pos[0], node.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT, node.size[0],
               node.size[1] + window.LiteGraph.NODE_TITLE_HEIGHT]}));
    const groups = window.app.graph._groups.map(group => ({title: group.title, rect: [...group._bounding]}));
    return {nodes, groups};
}"""


def _needs_browser():
    """Skip without a system Chromium (.ci/run installs Debian's) or playwright (a test dependency); under CI both
    must be there, and their absence fails (``ci.py``)."""
    if CHROMIUM is None:
        skip_or_fail("no chromium executable (apt-get install chromium)")
    importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser(comfy_server):
    """Chromium, and a function that opens a page on the test ComfyUI server (the pack, the test models,
    input/picture.png) once the frontend is up."""
    _needs_browser()
    from playwright.sync_api import sync_playwright

    settings = comfy_server.base_dir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))  # no first-run template dialog
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])

        def open_page():
            page = chromium.new_page(viewport=VIEWPORT)
            page.goto(comfy_server.url)
            page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && window.app.canvas",
                                   timeout=120_000)
            return page

        yield open_page
        chromium.close()


@pytest.fixture(scope="module")
def browser_page(browser):
    """One page for the tests that do not look at the screen."""
    return browser()


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get_json("/object_info")


def load(page, path: Path) -> dict:
    """Load a UI file the way the template browser does (clean graph, saved view restored, named); its JSON."""
    workflow = json.loads(path.read_text())
    page.evaluate("async ([graph, name]) => { await window.app.loadGraphData(graph, true, true, name); }",
                  [workflow, path.stem])
    page.wait_for_timeout(800)
    return workflow


def declared_inputs(object_info: dict, class_type: str) -> set[str]:
    spec = object_info[class_type]["input"]
    return set(spec.get("required", {})) | set(spec.get("optional", {}))


def overlaps(a: list, b: list) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def inside(inner: list, outer: list) -> bool:
    return (outer[0] <= inner[0] and inner[0] + inner[2] <= outer[0] + outer[2] and outer[1] <= inner[1]
            and inner[1] + inner[3] <= outer[1] + outer[3])


def layout_problems(boxes: dict) -> list[str]:
    """Nodes over nodes, groups over groups, nodes in no group."""
    problems = []
    nodes, groups = boxes["nodes"], boxes["groups"]
    for index, node in enumerate(nodes):
        for other in nodes[index + 1:]:
            if overlaps(node["rect"], other["rect"]):
                problems.append(f"{node['title']!r} {node['rect']} overlaps {other['title']!r} {other['rect']}")
        if not any(inside(node["rect"], group["rect"]) for group in groups):
            problems.append(f"{node['title']!r} {node['rect']} is in no group")
    for index, group in enumerate(groups):
        for other in groups[index + 1:]:
            if overlaps(group["rect"], other["rect"]):
                problems.append(f"group {group['title']!r} overlaps group {other['title']!r}")
    return problems


GRAPH_ON_SCREEN = """() => {
    const canvas = window.app.canvas, box = canvas.canvas.getBoundingClientRect();
    const [ox, oy] = canvas.ds.offset, scale = canvas.ds.scale;
    const rects = window.app.graph._groups.map(group => [...group._bounding]);
    const left = Math.min(...rects.map(r => r[0])), top = Math.min(...rects.map(r => r[1]));
    const right = Math.max(...rects.map(r => r[0] + r[2])), bottom = Math.max(...rects.map(r => r[1] + r[3]));
    return [box.left + (left + ox) * scale, box.top + (top + oy) * scale,
            box.left + (right + ox) * scale, box.top + (bottom + oy) * scale];
}"""


def save_screenshot(page, name: str, folder: Path) -> Path:
    """The page as it is now into ``folder/<name>.png``; with $REFINERY_SCREENSHOTS set, also the template thumbnail
    ``workflows/<name>.jpg``: the graph's part of the same screenshot on a square of the canvas colour (the template
    browser shows thumbnails in square cards, cropping what does not fit), THUMBNAIL_SIZE wide."""
    folder.mkdir(parents=True, exist_ok=True)
    screenshot = folder / f"{name}.png"
    page.screenshot(path=str(screenshot))
    if os.environ.get("REFINERY_SCREENSHOTS"):
        from PIL import Image

        left, top, right, bottom = page.evaluate(GRAPH_ON_SCREEN)
        with Image.open(screenshot) as picture:
            picture = picture.convert("RGB")
            margin = 16
            box = (max(0, round(left) - margin), max(0, round(top) - margin),
                   min(picture.width, round(right) + margin), min(picture.height, round(bottom) + margin))
            graph = picture.crop(box)
            side = max(graph.size)
            square = Image.new("RGB", (side, side), picture.getpixel((picture.width // 2, picture.height - 5)))
            square.paste(graph, ((side - graph.width) // 2, (side - graph.height) // 2))
            square.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.LANCZOS).save(
                PACK_ROOT / "workflows" / f"{name}.jpg", quality=88, optimize=True)
    return screenshot


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[path.stem for path in UI_WORKFLOWS])
def test_ui_workflow_queues_what_its_api_twin_says(browser_page, object_info, path):
    """graphToPrompt() of the loaded UI file == api/<name>_api.json: same node ids, types, titles, and every input the
    node declares (frontend-only widgets such as PreviewAny's display toggle are sent too; the server ignores
    undeclared inputs, so they are left out of the comparison)."""
    page = browser_page
    load(page, path)
    unknown = page.evaluate("() => window.app.graph._nodes.filter(node => !window.LiteGraph.registered_node_types"
                            "[node.type]).map(node => node.type)")
    assert unknown == [], f"node types missing in the frontend: {unknown}"
    queued = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    expected = json.loads((API_DIR / f"{path.stem}_api.json").read_text())
    assert sorted(queued, key=int) == sorted(expected, key=int)
    for node_id, node in expected.items():
        sent = queued[node_id]
        assert sent["class_type"] == node["class_type"]
        assert sent.get("_meta", {}).get("title") == node["_meta"]["title"], node_id
        declared = declared_inputs(object_info, node["class_type"])
        inputs = {name: value for name, value in sent["inputs"].items() if name in declared}
        assert inputs == node["inputs"], f"node {node_id} ({node['_meta']['title']}) is queued with other inputs"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[path.stem for path in UI_WORKFLOWS])
def test_ui_workflow_opens_readable_in_titled_groups_with_nothing_overlapping(browser, path, tmp_path):
    page = browser()  # a fresh page: one tab, as a user who opens the template sees it
    workflow = load(page, path)
    view = page.evaluate("() => ({scale: window.app.canvas.ds.scale, offset: [...window.app.canvas.ds.offset], "
                         "lowQuality: window.app.canvas.low_quality, width: window.app.canvas.canvas.clientWidth, "
                         "height: window.app.canvas.canvas.clientHeight})")
    assert view["scale"] >= READABLE_SCALE and not view["lowQuality"], view
    assert view["scale"] == pytest.approx(workflow["extra"]["ds"]["scale"])  # the saved view, not a fitted one
    boxes = page.evaluate(NODE_BOXES)
    assert boxes["groups"] and all(group["title"] for group in boxes["groups"])
    assert layout_problems(boxes) == []
    first = min(boxes["groups"], key=lambda group: (group["rect"][1], group["rect"][0]))["rect"]
    left, top = ((first[0] + view["offset"][0]) * view["scale"], (first[1] + view["offset"][1]) * view["scale"])
    assert 50 <= left < view["width"] / 2 and 50 <= top < view["height"] / 2, (left, top)
    notes = [node for node in workflow["nodes"] if node["type"] in ("Note", "MarkdownNote")]
    assert notes and "models/" in notes[0]["widgets_values"][0]
    screenshot = save_screenshot(page, path.stem, Path(os.environ.get("REFINERY_SCREENSHOTS") or tmp_path))
    page.close()
    assert screenshot.stat().st_size > 10_000


def _get_json(comfy_server, path: str, tries: int = 5):
    """GET ``path``, retried: a server busy running a graph on a loaded CPU may miss the client's 30 s timeout."""
    for attempt in range(tries):
        try:
            return comfy_server.get_json(path)
        except OSError:  # socket timeout, connection reset (urllib.error.URLError is an OSError)
            if attempt == tries - 1:
                raise
            time.sleep(2.0)


def _wait_for_run(comfy_server, prompt_ids_before: set, timeout: float = 1200.0) -> dict:
    """The history entry of the prompt the page queued (the only new one), once it has finished."""
    started = time.monotonic()
    while time.monotonic() < started + timeout:
        history = _get_json(comfy_server, "/history")
        new = [entry for prompt_id, entry in history.items() if prompt_id not in prompt_ids_before]
        if new and new[0].get("status", {}).get("completed") is not None and \
                new[0]["status"].get("status_str") in ("success", "error"):
            return new[0]
        queue = _get_json(comfy_server, "/queue")
        if not new and not queue["queue_running"] and not queue["queue_pending"] and \
                time.monotonic() > started + 15:
            raise AssertionError("the frontend queued nothing (did the server refuse the prompt?):\n"
                                 f"{comfy_server.log_tail()}")
        time.sleep(2.0)
    raise AssertionError(f"the queued prompt did not finish within {timeout:.0f} s:\n{comfy_server.log_tail()}")


def _stop_everything(comfy_server) -> None:
    """Clear the queue and interrupt the running prompt, so a failed test leaves the server idle for the next."""
    for path, body in (("/api/queue", {"clear": True}), ("/api/interrupt", {})):
        request = urllib.request.Request(comfy_server.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30).close()
        except OSError:
            pass


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[path.stem for path in UI_WORKFLOWS])
def test_ui_workflow_runs_from_the_frontend_and_its_previews_overlap_nothing(browser, comfy_server, path, tmp_path):
    page = browser()  # a page of its own: a failure here leaves nothing behind for the next workflow
    try:
        load(page, path)
        page.evaluate("""(values) => {
            for (const node of window.app.graph._nodes)
                for (const widget of node.widgets ?? [])
                    if (widget.name in values
                            && !(node.inputs ?? []).some(i => i.name === widget.name && i.link != null)) {
                        widget.value = values[widget.name];
                        widget.callback?.(widget.value);
                    }
        }""", RUN_VALUES)
        before = set(_get_json(comfy_server, "/history"))
        page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
        entry = _wait_for_run(comfy_server, before)
        assert entry["status"]["status_str"] == "success", entry["status"]
        shown = {node_id for node_id, output in entry["outputs"].items() if output.get("images")}
        assert shown, "the run showed no picture"
        ids = page.evaluate("() => window.app.graph._nodes.map(node => node.id)")
        for node_id in ids:  # the frontend sizes a node for its preview when it draws it: bring each into view
            page.evaluate("(id) => { window.app.canvas.centerOnNode(window.app.graph.getNodeById(id)); "
                          "window.app.canvas.draw(true, true); }", node_id)
            if str(node_id) in shown:
                page.wait_for_function("(id) => (window.app.graph.getNodeById(id).imgs?.length ?? 0) > 0",
                                       arg=node_id, timeout=120_000)
        page.wait_for_timeout(500)
        boxes = page.evaluate(NODE_BOXES)
        assert layout_problems(boxes) == []
        page.evaluate("() => { window.app.canvas.ds.scale = 0.6; window.app.canvas.ds.offset = [100, 150]; "
                      "window.app.canvas.setDirty(true, true); }")
        page.wait_for_timeout(500)
        page.screenshot(path=str(tmp_path / f"{path.stem}_after_run.png"))
    finally:
        _stop_everything(comfy_server)
        page.close()
