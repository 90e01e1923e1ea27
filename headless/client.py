"""An asynchronous client of a ComfyUI server's HTTP and websocket API (aiohttp), for the headless runner.

Endpoints (ComfyUI 0.8 ``server.py``): ``GET /system_stats`` (reachability), ``GET /object_info`` (node types),
``POST /upload/image`` (multipart), ``POST /prompt`` (``{"prompt", "client_id"}`` -> ``{"prompt_id"}`` or 400 with
``error``/``node_errors``), ``GET /ws?clientId=`` (progress, executing, execution_error/success/interrupted),
``GET /history/<id>`` (status and outputs), ``GET /queue`` (running and pending prompts), ``GET /view`` (output and
preview files), ``POST /queue {"delete": [...]}`` and ``POST /interrupt {"prompt_id"}`` (cancel).

A lost connection raises ServerUnreachable; ``reconnect`` waits for the server with the same back-off as at the
start (``job.run_job`` uses it to carry a prompt over a server restart).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp

from ..trainers.common.atomic import atomic_write_bytes, atomic_write_text
from .outputs import FileDownload, TextOutput, plan_saves

logger = logging.getLogger(__name__)

SOCKET_CLOSED = "socket_closed"  # the event ``_listen`` gives every waiting prompt when the websocket ends
ENDING_EVENTS = ("execution_success", "execution_error", "execution_interrupted", SOCKET_CLOSED)
KNOWN_PACKS = {  # class-type prefix -> the pack that provides it (for "node type missing" messages)
    "Refinery": "ComfyUI-Refinery (this pack: clone it into ComfyUI/custom_nodes/ and restart the server)",
}


class HeadlessError(RuntimeError):
    """An error the user can act on; ``str()`` is the whole message."""


class ServerUnreachable(HeadlessError):
    """No answer from the server (not started, stopped, or the connection dropped)."""


class PromptLost(HeadlessError):
    """The server knows nothing of a prompt this client queued (neither queued, running nor in its history): it was
    restarted, or the prompt was deleted from its queue."""


class PreviewLost(PromptLost):
    """A preview of a finished prompt is gone from the server (ComfyUI deletes previews when it restarts)."""


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
    """A finished prompt: outputs as in ``/history`` (node id -> ui dict); files: every file saved (downloads and
    text files); texts: the texts the nodes showed, as saved (``outputs.TextOutput`` with absolute targets)."""

    prompt_id: str
    outputs: dict
    files: list[Path] = field(default_factory=list)
    texts: list[TextOutput] = field(default_factory=list)


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


def _download_failure(params: dict, status: int, node_id: str) -> HeadlessError:
    """The error for a failed ``GET /view``: PreviewLost for a missing preview (it says why and how to go on without
    it), else HeadlessError."""
    message = f"Downloading {params['filename']!r} (type {params['type']}) of node {node_id} failed: HTTP {status}."
    if params["type"] == "temp" and status == 404:
        return PreviewLost(message + " Previews are temporary: ComfyUI deletes them when it restarts. Run the prompt "
                                     "again, or pass --previews none to save only the output files.")
    return HeadlessError(message)


async def _next_event_may_end(events: asyncio.Queue, poll_seconds: float,
                              on_progress: Callable[[str, dict], None] | None) -> bool:
    """Wait up to ``poll_seconds`` for a prompt's next websocket event (given to ``on_progress``). True when the
    server should be asked whether the prompt ended: an ending event, the socket closed, or no event (poll)."""
    try:
        event = await asyncio.wait_for(events.get(), timeout=poll_seconds)
    except asyncio.TimeoutError:
        return True
    kind, data = event.get("type", ""), event.get("data") or {}
    if on_progress:
        on_progress(kind, data)
    return kind in ENDING_EVENTS or (kind == "executing" and data.get("node") is None)


class ComfyClient:
    """One client id, one HTTP session and one websocket to ``url``. Use as ``async with ComfyClient(url) as c``.

    retries/backoff: connection attempts for reachability (``backoff * 2**i`` seconds apart, capped at 30 s), at the
    start and again in ``reconnect`` after the connection drops.
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
        self.connection = 0  # counts the reconnections: a caller that saw connection n asks to reconnect from n
        self._reconnecting = asyncio.Lock()
        self._gave_up: ServerUnreachable | None = None

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
        await self._close_socket()
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

    async def reconnect(self, seen_connection: int) -> None:
        """After a lost connection: wait for the server (``retries`` tries with back-off, as at the start), then
        reopen the websocket. Several callers that lost connection ``seen_connection`` share one reconnection;
        once the server stayed away, every later call raises the same ServerUnreachable at once."""
        async with self._reconnecting:
            if self._gave_up is not None:
                raise self._gave_up
            if self.connection != seen_connection:
                return  # another caller reconnected meanwhile
            await self._close_socket()
            try:
                await self.wait_until_reachable()
            except ServerUnreachable as error:
                self._gave_up = error
                raise
            await self._open_socket()
            self.connection += 1

    async def _close_socket(self) -> None:
        if self._listener:
            self._listener.cancel()
            self._listener = None
        if self._socket is not None:
            await self._socket.close()
            self._socket = None

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
        """Route websocket events to their prompt's queue. When the socket ends (the server went away), every
        waiting prompt gets a SOCKET_CLOSED event, so that ``wait`` asks the server at once instead of at its next
        poll (and goes on by polling)."""
        try:
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
        except (aiohttp.ClientError, OSError) as error:
            logger.debug("websocket closed: %s", error)
        for events in self._events.values():
            events.put_nowait({"type": SOCKET_CLOSED, "data": {}})

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

    async def in_queue(self, prompt_id: str) -> bool:
        """Whether ``prompt_id`` is running or pending (``GET /queue``: lists of ``[number, prompt_id, ...]``)."""
        status, answer = await self._json("GET", "/queue")
        if status != 200 or not isinstance(answer, dict):
            raise HeadlessError(f"GET /queue answered HTTP {status}: {answer!r}.")
        return any(isinstance(item, list) and len(item) > 1 and item[1] == prompt_id
                   for key in ("queue_running", "queue_pending") for item in answer.get(key) or [])

    async def _finished_or_lost(self, prompt_id: str) -> dict | None:
        """The prompt's history entry once it has ended, None while it is queued or running; PromptLost when the
        server knows nothing of it. (History, then queue, then history again: a prompt ending between the first two
        requests is found by the third.)"""
        entry = await self.history(prompt_id)
        if not entry and not await self.in_queue(prompt_id):
            entry = await self.history(prompt_id)
            if not entry:
                self.owned.discard(prompt_id)
                raise PromptLost(f"The server at {self.url} does not know prompt {prompt_id} any more (it was "
                                 "restarted, or the prompt was deleted from its queue).")
        if not entry:
            return None
        status = entry.get("status") or {}
        if status.get("status_str") not in ("success", "error") and not entry.get("outputs"):
            return None
        return entry

    async def wait(self, prompt_id: str, graph: dict,
                   on_progress: Callable[[str, dict], None] | None = None, poll_seconds: float = 2.0) -> dict:
        """Follow ``prompt_id`` (websocket events, with /history polled as a fallback) until it ends; returns its
        outputs. Raises ExecutionFailed (node and message), ExecutionInterrupted, PromptLost (the server forgot it:
        restarted) or ServerUnreachable (connection lost)."""
        events = self._events.setdefault(prompt_id, asyncio.Queue())
        ask_now = True  # first ask the server: a prompt followed again after a reconnection may have ended meanwhile
        while True:
            if not ask_now and not await _next_event_may_end(events, poll_seconds, on_progress):
                continue
            ask_now = False
            entry = await self._finished_or_lost(prompt_id)
            if entry is None:
                continue
            status = entry.get("status") or {}
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

    async def save_outputs(self, outputs: dict, graph: dict, folder: Path,
                           previews: str = "ends") -> tuple[list[Path], list[TextOutput]]:
        """Save what a finished prompt made into ``folder`` (``outputs.plan_saves``: output files, the previews
        ``previews`` selects, one .txt per distinct text), each written atomically. Returns (every saved path, the
        texts with absolute targets)."""
        folder = Path(folder)
        plan = plan_saves(outputs, graph, previews)
        saved = [await self._download(download, folder) for download in plan.downloads]
        texts = []
        for text in plan.texts:
            target = atomic_write_text(folder / text.target, text.text if text.text.endswith("\n") else text.text + "\n")
            texts.append(TextOutput(target, text.node_id, text.title, text.text))
            saved.append(target)
        return saved, texts

    async def _download(self, download: FileDownload, folder: Path) -> Path:
        entry = download.entry
        params = {"filename": entry["filename"], "subfolder": entry.get("subfolder", ""),
                  "type": entry.get("type", "output")}
        target = folder / download.target
        try:
            async with self.session.get(f"{self.url}/view", params=params,
                                        timeout=aiohttp.ClientTimeout(total=self.timeout)) as response:
                if response.status != 200:
                    raise _download_failure(params, response.status, download.node_id)
                data = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            raise ServerUnreachable(f"Lost the ComfyUI server at {self.url} while downloading: {error}") from error
        return atomic_write_bytes(target, data)

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

