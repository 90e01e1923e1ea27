"""``refinery-headless`` against a small stand-in ComfyUI server on 127.0.0.1 (aiohttp, in a thread): what a prompt
shows is saved (text outputs, the previews of end nodes), a server that goes away mid-batch is waited for and the
batch continues, or stops with its state saved when it stays away, and the batch state re-runs the items whose
workflow, ``--set`` values or picture changed.

The stand-in speaks the endpoints the client uses with ComfyUI 0.8's shapes (``/prompt``, ``/history/<id>``,
``/queue``, ``/view``, ``/upload/image``, ``/ws``); a queued prompt ends at once, its outputs made from its nodes'
class types (``FakeComfy.outputs_of``). It replaces only the server: the client, its files and its state are real.
The real-server runs are in ``test_comfyui_headless.py``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import uuid
from pathlib import Path

import pytest

from ci import importorskip

importorskip("aiohttp")  # under CI a missing test dependency fails
from aiohttp import WSMsgType, web

from comfyui_refinery.headless.cli import main

WORKFLOW = {  # the stand-in's notion of a refine workflow: node 2 previews its heat map and shows a summary
    "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Load Image"}},
    "2": {"class_type": "FakeRefine", "inputs": {"image": ["1", 0], "prompt": "a fox", "seed": 1},
          "_meta": {"title": "G-Refine"}},
    "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}, "_meta": {"title": "PQ Heatmap"}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "refinery/refined"},
          "_meta": {"title": "Save Refined"}},
    "5": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}, "_meta": {"title": "Plan Summary"}},
    "6": {"class_type": "FakeReport", "inputs": {"image": ["2", 0]}, "_meta": {"title": "AQ Report"}},
    "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "refinery/report"},
          "_meta": {"title": "Save Report Map"}},
}
SUMMARY_LINES = 30  # the plan summary is long: `run` prints only its first lines


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FakeComfy:
    """A stand-in ComfyUI server on ``url`` (loopback), run in its own thread and event loop.

    ``crash_on_prompt = n``: the n-th ``POST /prompt`` is accepted, then the server dies before the prompt ends
    (listening socket and connections closed); ``restart_after`` seconds later it comes back with an empty queue and
    history (a restarted ComfyUI), or never when None. ``prompts``: the graphs queued, in order, across restarts.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prompts: list[dict] = []
        self.crash_on_prompt: int | None = None
        self.restart_after: float | None = None
        self.files: dict[tuple[str, str, str], bytes] = {}  # (type, subfolder, filename) -> bytes
        self.history: dict[str, dict] = {}
        self.running: list[list] = []  # queue entries [number, prompt_id, graph, extra, outputs] of a crashing prompt
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.counter = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner: web.AppRunner | None = None

    # -- life cycle (called from the test thread) ---------------------------------------------------------------------
    def start(self) -> FakeComfy:
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _start(self) -> None:
        def answer(value: dict):
            async def handler(request: web.Request) -> web.Response:
                return web.json_response(value)
            return handler

        app = web.Application()
        app.router.add_get("/system_stats", answer({"system": {}, "devices": []}))
        app.router.add_post("/upload/image", self._upload)
        app.router.add_post("/prompt", self._prompt)
        app.router.add_get("/history/{prompt_id}", self._history)
        app.router.add_get("/queue", self._queue)
        app.router.add_post("/queue", answer({}))
        app.router.add_post("/interrupt", answer({}))
        app.router.add_get("/view", self._view)
        app.router.add_get("/ws", self._socket)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        """Die as a killed server does: queue, history and previews are gone; output files stay on disk."""
        if self.runner is None:
            return
        for ws in list(self.sockets.values()):
            await ws.close()
        self.sockets.clear()
        runner, self.runner = self.runner, None
        await runner.cleanup()
        self.history.clear()
        self.running.clear()
        self.files = {key: data for key, data in self.files.items() if key[0] != "temp"}

    async def _crash(self) -> None:
        await self._stop()
        if self.restart_after is not None:
            await asyncio.sleep(self.restart_after)
            await self._start()

    # -- what a prompt makes --------------------------------------------------------------------------------------
    def outputs_of(self, prompt_id: str, graph: dict) -> dict:
        """The /history outputs of ``graph``: SaveImage -> an output file, PreviewImage -> a temp file, FakeRefine
        -> its own temp preview and the summary text, PreviewAny -> the text of the node it shows, FakeReport ->
        the AQ report text."""
        outputs = {}
        prompt = next((node["inputs"]["prompt"] for node in graph.values() if node["class_type"] == "FakeRefine"), "")
        summary = "\n".join([f"plan for {prompt!r}"] + [f"region {n}: strength 0.{n}" for n in range(SUMMARY_LINES)])
        for node_id, node in graph.items():
            kind = node["class_type"]
            if kind in ("SaveImage", "PreviewImage", "FakeRefine"):
                self.counter += 1
                folder_type = "output" if kind == "SaveImage" else "temp"
                subfolder, _, prefix = node["inputs"].get("filename_prefix", "ComfyUI_temp").rpartition("/")
                entry = {"filename": f"{prefix}_{self.counter:05}_.png", "subfolder": subfolder, "type": folder_type}
                self.files[(folder_type, subfolder, entry["filename"])] = f"{node_id}:{prompt}".encode()
                outputs[node_id] = {"images": [entry]}
            if kind in ("FakeRefine", "PreviewAny"):
                outputs.setdefault(node_id, {})["text"] = [summary]
            if kind == "FakeReport":
                outputs[node_id] = {"text": [f"AQ report: 'fox' 0.8 for {prompt!r}"]}
        return outputs

    # -- endpoints ----------------------------------------------------------------------------------------------------
    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        image = form["image"]
        self.files[("input", "", image.filename)] = image.file.read()
        return web.json_response({"name": image.filename, "subfolder": "", "type": "input"})

    async def _prompt(self, request: web.Request) -> web.Response:
        body = await request.json()
        graph = body["prompt"]
        self.prompts.append(graph)
        prompt_id = str(uuid.uuid4())
        if self.crash_on_prompt == len(self.prompts):  # it runs until the crash
            self.running.append([len(self.prompts), prompt_id, graph, {}, []])
            asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(self._crash()))
            return web.json_response({"prompt_id": prompt_id, "number": len(self.prompts), "node_errors": {}})
        self.history[prompt_id] = {"prompt": [len(self.prompts), prompt_id, graph, {}, []],
                                   "outputs": self.outputs_of(prompt_id, graph),
                                   "status": {"status_str": "success", "completed": True, "messages": []}}
        ws = self.sockets.get(body.get("client_id"))
        if ws is not None and not ws.closed:
            await ws.send_json({"type": "executing", "data": {"node": None, "prompt_id": prompt_id}})
        return web.json_response({"prompt_id": prompt_id, "number": len(self.prompts), "node_errors": {}})

    async def _queue(self, request: web.Request) -> web.Response:
        return web.json_response({"queue_running": self.running, "queue_pending": []})  # other prompts end at once

    async def _history(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self.history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry else {})

    async def _view(self, request: web.Request) -> web.Response:
        query = request.rel_url.query
        data = self.files.get((query.get("type", "output"), query.get("subfolder", ""), query["filename"]))
        return web.Response(body=data) if data is not None else web.Response(status=404)

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets[request.rel_url.query.get("clientId", "")] = ws
        async for message in ws:
            if message.type == WSMsgType.ERROR:
                break
        return ws


@pytest.fixture
def server():
    fake = FakeComfy().start()
    yield fake
    fake.close()


@pytest.fixture
def workflow(tmp_path) -> Path:
    path = tmp_path / "fake_api.json"
    path.write_text(json.dumps(WORKFLOW))
    return path


@pytest.fixture
def pictures(tmp_path) -> Path:
    folder = tmp_path / "pictures"
    folder.mkdir()
    for index in range(4):
        (folder / f"shot_{index}.png").write_bytes(f"picture {index}".encode())
    return folder


def fast(server: FakeComfy, retries: int = 6) -> list[str]:
    return ["--server", server.url, "--retries", str(retries), "--backoff", "0.05", "--quiet"]


def state_of(output: Path) -> dict:
    return json.loads((output / "headless-state.json").read_text())


# -- what a prompt shows is saved -------------------------------------------------------------------------------------
def test_run_saves_each_text_once_and_the_previews_of_end_nodes(server, workflow, pictures, tmp_path, capsys):
    output = tmp_path / "out"
    code = main(["run", str(workflow), "--image", str(pictures / "shot_0.png"), "--set", "G-Refine.prompt=a red fox",
                 *fast(server), "--output", str(output)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    saved = sorted(str(path.relative_to(output)) for path in output.rglob("*") if path.is_file())
    assert saved == ["aq-report.txt", "plan-summary.txt", "previews/pq-heatmap.png", "refinery/refined_00003_.png",
                     "refinery/report_00004_.png"]
    summary = (output / "plan-summary.txt").read_text()
    assert summary.startswith("plan for 'a red fox'\nregion 0: strength 0.0") and summary.endswith("0.29\n")
    assert (output / "previews" / "pq-heatmap.png").read_bytes() == b"3:a red fox", "the end node's preview"
    assert (output / "aq-report.txt").read_text() == "AQ report: 'fox' 0.8 for 'a red fox'\n"
    # printed: every saved file, the short report whole, the long summary's first lines and where the rest is
    assert "plan-summary.txt" in printed.out and "previews/pq-heatmap.png" in printed.out
    assert "AQ Report (node 6" in printed.out and "AQ report: 'fox' 0.8 for 'a red fox'" in printed.out
    assert "Plan Summary (node 5" in printed.out and "region 10: strength 0.10" in printed.out
    assert "region 11:" not in printed.out and "(19 more line(s) in the file)" in printed.out


@pytest.mark.parametrize("choice, previews", [("all", ["g-refine.png", "pq-heatmap.png"]), ("none", [])])
def test_previews_choice(server, workflow, tmp_path, capsys, choice, previews):
    output = tmp_path / choice
    code = main(["run", str(workflow), "--set", "Load Image.image=picture.png", *fast(server), "--previews", choice,
                 "--output", str(output)])
    assert code == 0, capsys.readouterr().err
    assert sorted(path.name for path in (output / "previews").glob("*")) == previews
    assert (output / "plan-summary.txt").is_file(), "texts are saved whatever the previews choice"


# -- a server that goes away mid-batch --------------------------------------------------------------------------------
@pytest.mark.parametrize("concurrency", [1, 2])
def test_batch_waits_for_a_restarted_server_and_requeues_the_lost_prompt(server, workflow, pictures, tmp_path,
                                                                         capsys, caplog, concurrency):
    server.crash_on_prompt, server.restart_after = 2, 0.4
    output = tmp_path / "out"
    code = main(["batch", str(workflow), "--images", str(pictures), "--concurrency", str(concurrency),
                 *fast(server), "--output", str(output)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "4 done, 0 failed, 0 skipped" in printed.out
    assert "Waiting for the server to come back" in caplog.text, "the dropped connection is seen"
    assert "does not know prompt" in caplog.text and "Queueing it again" in caplog.text
    # the prompt the crash lost is queued again; with 2 at a time, so is the other one when its preview was still to
    # be downloaded (the restart deletes previews); each said on stderr
    requeued = caplog.text.count("Queueing it again")
    assert 1 <= requeued <= concurrency and len(server.prompts) == 4 + requeued
    for index in range(4):
        assert (output / f"shot_{index}" / "plan-summary.txt").is_file()
    assert {entry["status"] for entry in state_of(output)["items"].values()} == {"done"}


def test_batch_stops_with_its_state_saved_when_the_server_stays_away_and_a_rerun_continues(
        server, workflow, pictures, tmp_path, capsys):
    server.crash_on_prompt, server.restart_after = 2, None
    output = tmp_path / "out"
    arguments = ["batch", str(workflow), "--images", str(pictures), *fast(server, retries=3), "--output", str(output)]
    code = main(arguments)
    printed = capsys.readouterr()
    assert code == 3
    assert f"The ComfyUI server at {server.url} went away during the batch and did not come back" in printed.err
    assert "1 of 4 item(s) ended" in printed.err and "3 not run" in printed.err
    assert "run the same command again to continue" in printed.err and "headless-state.json" in printed.err
    assert {key: entry["status"] for key, entry in state_of(output)["items"].items()} == {"shot_0": "done"}, \
        "items not run are not recorded as failed"

    server.crash_on_prompt = None
    server.start()
    assert main(arguments) == 0
    assert "3 done, 0 failed, 1 skipped" in capsys.readouterr().out
    assert len(server.prompts) == 2 + 3


# -- the batch state follows what each item runs ----------------------------------------------------------------------
def test_rerun_runs_again_the_items_whose_settings_or_picture_changed(server, workflow, pictures, tmp_path, capsys,
                                                                       caplog):
    output = tmp_path / "out"
    arguments = ["batch", str(workflow), "--images", str(pictures), *fast(server), "--output", str(output)]
    assert main(arguments) == 0
    capsys.readouterr()
    assert main(arguments) == 0
    assert "0 done, 0 failed, 4 skipped" in capsys.readouterr().out

    assert main([*arguments, "--set", "G-Refine.seed=2"]) == 0
    printed = capsys.readouterr()
    assert "4 done, 0 failed, 0 skipped" in printed.out
    assert "4 item(s) done before with another workflow, other --set values or another picture run again" in caplog.text
    assert all(graph["2"]["inputs"]["seed"] == 2 for graph in server.prompts[-4:])

    (pictures / "shot_2.png").write_bytes(b"another picture")
    assert main([*arguments, "--set", "G-Refine.seed=2"]) == 0
    assert "1 done, 0 failed, 3 skipped" in capsys.readouterr().out
    assert len(server.prompts) == 4 + 4 + 1

    assert main([*arguments, "--set", "G-Refine.seed=2", "--set", "G-Refine.prompt=a fox"]) == 0  # the default: same
    assert "0 done, 0 failed, 4 skipped" in capsys.readouterr().out


def test_state_files_without_fingerprints_run_their_items_again_and_newer_ones_are_refused(
        server, workflow, pictures, tmp_path, capsys, caplog):
    output = tmp_path / "out"
    output.mkdir()
    old = {"workflow": str(workflow), "items": {
        "shot_0": {"status": "done", "prompt_id": "p0", "files": [], "error": None, "seconds": 1.0},
        "shot_1": {"status": "failed", "prompt_id": None, "files": [], "error": "Node 2 failed", "seconds": 1.0}}}
    (output / "headless-state.json").write_text(json.dumps(old))
    arguments = ["batch", str(workflow), "--images", str(pictures), *fast(server), "--output", str(output)]
    assert main(arguments) == 0
    printed = capsys.readouterr()
    assert "4 done, 0 failed, 0 skipped" in printed.out
    assert "written by an older refinery-headless" in caplog.text and "1 done item(s)" in caplog.text
    assert "other --set values" not in caplog.text, "one warning for the old file, not a second one"
    state = state_of(output)
    assert state["version"] == 2 and all(entry["fingerprint"] for entry in state["items"].values())

    (output / "headless-state.json").write_text(json.dumps({**state, "version": 3}))
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert "has state version 3" in err and "update ComfyUI-Refinery, or choose another --output folder" in err
