"""Every UI-format workflow of ``workflows/`` loads in the real ComfyUI frontend (the ``comfyui-frontend-package``
ComfyUI 0.8 serves) in headless Chromium: Debian's ``chromium`` driven by Playwright (no browser download,
``executable_path``). Checks: every node type is registered (none shows as missing), the nodes, links and widget
values are the file's, and a screenshot of the loaded graph is saved (into ``$REFINERY_SCREENSHOTS`` when set, else
the test's temporary folder; ``REFINERY_SCREENSHOTS=docs/screenshots`` refreshes the README's pictures)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

PACK_ROOT = Path(__file__).resolve().parent.parent
UI_WORKFLOWS = sorted(path for path in (PACK_ROOT / "workflows").glob("*.json") if not path.stem.endswith("_api"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _needs_browser():
    """Skip without a system Chromium (.ci/run installs Debian's); playwright is a test dependency, so its absence
    fails in CI."""
    if CHROMIUM is None:
        pytest.skip("no chromium executable (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[test]')"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser_page(comfyui_dir, tmp_path_factory):
    """A ComfyUI server with the pack (no models needed to load graphs) and a Chromium page on it."""
    _needs_browser()
    from comfyui_server import ComfyServer
    from playwright.sync_api import sync_playwright

    server = ComfyServer(comfyui_dir, tmp_path_factory.mktemp("comfyui-frontend"), PACK_ROOT)
    settings = server.base_dir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({  # no first-run template dialog, no minimap, full detail when zoomed out
        "Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "LiteGraph.Canvas.MinFontSizeForLOD": 1,
        "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1}))
    server.start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 2200, "height": 1100})
            page.goto(server.url)
            page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
            yield page
            browser.close()
    finally:
        server.stop()


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[path.stem for path in UI_WORKFLOWS])
def test_ui_workflow_loads_in_the_frontend_with_every_node_known(browser_page, path, tmp_path):
    workflow = json.loads(path.read_text())
    page = browser_page
    page.evaluate("async (graph) => { await window.app.loadGraphData(graph); }", workflow)
    page.wait_for_timeout(500)
    loaded = page.evaluate("""() => {
        const graph = window.app.graph;
        return {
            nodes: graph._nodes.map(node => ({id: node.id, type: node.type,
                                              known: !!window.LiteGraph.registered_node_types[node.type],
                                              widgets_values: node.widgets_values ?? null})),
            links: Object.keys(graph.links ?? {}).length || (graph.links?.size ?? 0),
        };
    }""")
    unknown = [node["type"] for node in loaded["nodes"] if not node["known"]]
    assert unknown == [], f"node types missing in the frontend: {unknown}"
    by_id = {node["id"]: node for node in loaded["nodes"]}
    assert sorted(by_id) == sorted(node["id"] for node in workflow["nodes"])
    assert loaded["links"] == len(workflow["links"])
    for node in workflow["nodes"]:
        assert by_id[node["id"]]["type"] == node["type"]
        if node.get("widgets_values") is not None:
            assert by_id[node["id"]]["widgets_values"] == node["widgets_values"], node["type"]

    page.mouse.click(1100, 1050)  # focus the canvas, then "." fits the view to the graph
    page.keyboard.press(".")
    page.wait_for_timeout(500)
    folder = Path(os.environ.get("REFINERY_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    screenshot = folder / f"{path.stem}.png"
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000
