"""An asynchronous client of a ComfyUI server's HTTP and websocket API (aiohttp), for the headless runner.

Endpoints (ComfyUI 0.8 ``server.py``): ``GET /system_stats`` (reachability), ``GET /object_info`` (node types),
``POST /upload/image`` (multipart), ``POST /prompt`` (``{"prompt", "client_id"}`` -> ``{"prompt_id"}`` or 400 with
``error``/``node_errors``), ``GET /ws?clientId=`` (progress, executing, execution_error/success/interrupted),
``GET /history/<id>`` (status and outputs), ``GET /view`` (output files), ``POST /queue {"delete": [...]}`` and
``POST /interrupt {"prompt_id"}`` (cancel).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp

logger = logging.getLogger(__name__)

OUTPUT_KEYS = ("images", "gifs", "video", "audio", "latents", "files", "3d")
KNOWN_PACKS = {  # class-type prefix -> the pack that provides it (for "node type missing" messages)
    "Refinery": "ComfyUI-Refinery (this pack: clone it into ComfyUI/custom_nodes/ and restart the server)",
}


class HeadlessError(RuntimeError):
    """An error the user can act on; ``str()`` is the whole message."""


class ServerUnreachable(HeadlessError):
    pass


class PromptRejected(HeadlessError):
    """``POST /prompt`` answered 400: ``error`` and ``node_errors`` as the server sent them."""

    def __init__(self, message: str, error: dict, node_errors: dict):
        super().__init__(message)
        self.error, self.node_errors = error, node_errors


class ExecutionFailed(HeadlessError):
    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


class ExecutionInterrupted(HeadlessError):
    pass


@dataclass
class PromptResult:
    """A finished prompt: outputs as in ``/history`` (node id -> ui dict); files: what was downloaded."""

    prompt_id: str
    outputs: dict
    files: list[Path] = field(default_factory=list)


def describe_rejection(answer: dict, graph: dict) -> str:
    """ComfyUI's validation answer as lines a user can act on: the prompt error, then each node's errors with its
    id and title; a missing node type names the pack to install."""
    error = answer.get("error") or {}
    message = error.get("message", "the server refused the prompt") if isinstance(error, dict) else str(error)
    lines = [f"The server refused the workflow: {message}"]
    if isinstance(error, dict) and "does not exist" in message:
        class_type = message.split("node ", 1)[-1].split(" does not exist")[0]
        pack = next((pack for prefix, pack in KNOWN_PACKS.items() if class_type.startswith(prefix)), None)
        lines.append(f"  node type {class_type!r} ({error.get('details', '')}) is not installed on the server: "
                     + (f"install {pack}." if pack else "install the custom node pack that provides it."))
    for node_id, entry in (answer.get("node_errors") or {}).items():
        title = graph.get(node_id, {}).get("_meta", {}).get("title") or entry.get("class_type", "?")
        for item in entry.get("errors", []):
            detail = f": {item['details']}" if item.get("details") else ""
            lines.append(f"  node {node_id} ({title}): {item.get('message')}{detail}")
    return "\n".join(lines)


class ComfyClient:
    """One client id, one HTTP session and one websocket to ``url``. Use as ``async with ComfyClient(url) as c``.

    retries/backoff: connection attempts for reachability (``backoff * 2**i`` seconds apart, capped at 30 s).
    """

    def __init__(self, url: str, retries: int = 5, backoff: float = 1.0, timeout: float = 60.0):
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise HeadlessError(f"Server URL {url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8188).")
        self.client_id = str(uuid.uuid4())
        self.retries, self.backoff, self.timeout = max(int(retries), 1), float(backoff), timeout
        self.session: aiohttp.ClientSession | None = None
        self._socket = None
        self._listener: asyncio.Task | None = None
        self._events: dict[str, asyncio.Queue] = {}
        self.owned: set[str] = set()  # prompt ids this client queued and that have not finished

    async def __aenter__(self) -> "ComfyClient":
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        try:
            await self.wait_until_reachable()
            await self._open_socket()
        except BaseException:
            await self.session.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        if self._listener:
            self._listener.cancel()
        if self._socket is not None:
            await self._socket.close()
        if self.session:
            await self.session.close()

    # -- connection ------------------------------------------------------------------------------------------------
    async def wait_until_reachable(self) -> dict:
        """``GET /system_stats``, retried with exponential back-off; ServerUnreachable after the last try."""
        last = None
        for attempt in range(self.retries):
            try:
                async with self.session.get(f"{self.url}/system_stats",
                                            timeout=aiohttp.ClientTimeout(total=self.timeout)) as response:
                    if response.status == 200:
                        return await response.json()
                    last = f"HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
                last = f"{type(error).__name__}: {error}"
            if attempt + 1 < self.retries:
                delay = min(self.backoff * 2 ** attempt, 30.0)
                logger.warning("ComfyUI at %s not reachable (%s); retrying in %.1f s", self.url, last, delay)
                await asyncio.sleep(delay)
        raise ServerUnreachable(
            f"No ComfyUI server answered at {self.url} after {self.retries} tries ({last}). Start it (python main.py "
            f"--listen ... --port ...) or pass the right --server URL."
        )

    async def _open_socket(self) -> None:
        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        try:
            self._socket = await self.session.ws_connect(ws_url, heartbeat=30)
        except (aiohttp.ClientError, OSError) as error:  # progress then comes from polling /history only
            logger.warning("no websocket at %s (%s): following prompts by polling", ws_url, error)
            self._socket = None
            return
        self._listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        async for message in self._socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue  # binary preview frames
            try:
                event = json.loads(message.data)
            except ValueError:
                continue
            prompt_id = (event.get("data") or {}).get("prompt_id")
            if prompt_id:
                self._events.setdefault(prompt_id, asyncio.Queue()).put_nowait(event)

    # -- requests ---------------------------------------------------------------------------------------------------
    async def _json(self, method: str, path: str, **kwargs):
        try:
            async with self.session.request(method, f"{self.url}{path}",
                                            timeout=aiohttp.ClientTimeout(total=self.timeout), **kwargs) as response:
                text = await response.text()
                return response.status, (json.loads(text) if text.strip() else None)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            raise ServerUnreachable(f"Lost the ComfyUI server at {self.url} during {method} {path}: {error}") from error

    async def node_types(self) -> set[str]:
        status, info = await self._json("GET", "/object_info")
        if status != 200:
            raise HeadlessError(f"GET /object_info answered HTTP {status}.")
        return set(info)

    async def upload_image(self, path: Path) -> str:
        """Upload a local picture to the server's input folder; returns the name LoadImage takes."""
        path = Path(path)
        if not path.is_file():
            raise HeadlessError(f"Image {path} does not exist.")
        form = aiohttp.FormData()
        form.add_field("image", path.read_bytes(), filename=path.name, content_type="application/octet-stream")
        form.add_field("type", "input")
        status, answer = await self._json("POST", "/upload/image", data=form)
        if status != 200 or not answer or "name" not in answer:
            raise HeadlessError(f"Uploading {path} failed: HTTP {status} {answer!r}.")
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    async def queue(self, graph: dict) -> str:
        status, answer = await self._json("POST", "/prompt", json={"prompt": graph, "client_id": self.client_id})
        if status == 200 and answer and "prompt_id" in answer:
            self.owned.add(answer["prompt_id"])
            return answer["prompt_id"]
        answer = answer if isinstance(answer, dict) else {"error": {"message": f"HTTP {status}: {answer!r}"}}
        raise PromptRejected(describe_rejection(answer, graph), answer.get("error") or {}, answer.get("node_errors") or {})

    async def history(self, prompt_id: str) -> dict | None:
        status, answer = await self._json("GET", f"/history/{prompt_id}")
        return (answer or {}).get(prompt_id) if status == 200 else None

    async def wait(self, prompt_id: str, graph: dict,
                   on_progress: Callable[[str, dict], None] | None = None, poll_seconds: float = 2.0) -> dict:
        """Follow ``prompt_id`` (websocket events, with /history polled as a fallback) until it ends; returns its
        outputs. Raises ExecutionFailed (node and message) or ExecutionInterrupted."""
        events = self._events.setdefault(prompt_id, asyncio.Queue())
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=poll_seconds)
                if on_progress:
                    on_progress(event.get("type", ""), event.get("data") or {})
                if event.get("type") not in ("execution_success", "execution_error", "execution_interrupted") and \
                        not (event.get("type") == "executing" and (event.get("data") or {}).get("node") is None):
                    continue
            except asyncio.TimeoutError:
                pass
            entry = await self.history(prompt_id)
            if not entry:
                continue
            status = entry.get("status") or {}
            if status.get("status_str") not in ("success", "error") and not entry.get("outputs"):
                continue
            self.owned.discard(prompt_id)
            self._events.pop(prompt_id, None)
            messages = status.get("messages") or []
            for name, data in messages:
                if name == "execution_error":
                    node_id = str(data.get("node_id"))
                    title = graph.get(node_id, {}).get("_meta", {}).get("title") or data.get("node_type")
                    raise ExecutionFailed(
                        f"Node {node_id} ({title}) failed: {data.get('exception_type')}: {data.get('exception_message')}",
                        data)
                if name == "execution_interrupted":
                    raise ExecutionInterrupted(f"Prompt {prompt_id} was interrupted on the server.")
            return entry.get("outputs") or {}

    async def download_outputs(self, outputs: dict, folder: Path, include_temp: bool = False) -> list[Path]:
        """Save every output file (images, latents, ...) of a finished prompt into ``folder`` (atomically: a
        temporary name, then renamed). Previews (type ``temp``) only with ``include_temp``."""
        folder = Path(folder)
        saved = []
        for node_outputs in outputs.values():
            for key in OUTPUT_KEYS:
                for entry in node_outputs.get(key, []) or []:
                    if not isinstance(entry, dict) or "filename" not in entry:
                        continue
                    if entry.get("type") == "temp" and not include_temp:
                        continue
                    saved.append(await self._download(entry, folder))
        return saved

    async def _download(self, entry: dict, folder: Path) -> Path:
        params = {"filename": entry["filename"], "subfolder": entry.get("subfolder", ""),
                  "type": entry.get("type", "output")}
        parts = [part for part in Path(params["subfolder"]).parts if part not in ("..", "/", "")]
        target = folder.joinpath(*parts, Path(entry["filename"]).name)
        try:
            async with self.session.get(f"{self.url}/view", params=params,
                                        timeout=aiohttp.ClientTimeout(total=self.timeout)) as response:
                if response.status != 200:
                    raise HeadlessError(f"Downloading {params} failed: HTTP {response.status}.")
                data = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            raise ServerUnreachable(f"Lost the ComfyUI server at {self.url} while downloading: {error}") from error
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".part")
        temporary.write_bytes(data)
        os.replace(temporary, target)
        return target

    async def cancel(self, prompt_ids: set[str] | None = None) -> list[str]:
        """Remove this client's pending prompts from the queue and interrupt its running one. Returns the ids."""
        ids = sorted(self.owned if prompt_ids is None else prompt_ids)
        if not ids:
            return []
        await self._json("POST", "/queue", json={"delete": ids})
        for prompt_id in ids:
            await self._json("POST", "/interrupt", json={"prompt_id": prompt_id})
        self.owned.difference_update(ids)
        return ids

    async def run(self, graph: dict, folder: Path, on_progress=None, include_temp: bool = False) -> PromptResult:
        """Queue, follow and download one graph."""
        prompt_id = await self.queue(graph)
        outputs = await self.wait(prompt_id, graph, on_progress)
        files = await self.download_outputs(outputs, folder, include_temp)
        return PromptResult(prompt_id, outputs, files)
