"""A real ComfyUI server (``python main.py --cpu``, loopback only) with this pack as a custom node, for tests that
queue API-format workflows over HTTP exactly as a render farm does: ``POST /prompt``, ``GET /history/<id>``,
``GET /view``.

Everything the server reads and writes lives under one base folder (``--base-directory``): ``custom_nodes/`` holds
a symlink to the pack, ``models/`` symlinks to the test models, ``input/`` the pictures, ``output/`` what the
graphs save. The client side is the standard library's ``urllib``: the tests check the server's answers, not a
client library.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACK_LINK_NAME = "ComfyUI-Refinery"


class ServerError(RuntimeError):
    """The server did not start, or answered in a way a test did not expect."""


@dataclass
class QueuedRun:
    """The outcome of one queued prompt.

    status: ``success`` / ``error`` (from the history entry) or ``rejected`` (``POST /prompt`` refused it: then
    ``node_errors`` and ``error`` hold ComfyUI's validation answer); outputs: node id -> ui output dict;
    messages: the history's ``status.messages`` ([event, data] pairs: execution_start, execution_error, ...).
    """

    prompt_id: str | None
    status: str
    outputs: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)
    error: dict | None = None
    node_errors: dict = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return self.status == "success"

    def execution_error(self) -> dict | None:
        for event, data in self.messages:
            if event == "execution_error":
                return data
        return None

    def error_text(self) -> str:
        parts = []
        if self.error:
            parts.append(f"{self.error.get('message')}: {self.error.get('details')}")
        for node_id, entry in self.node_errors.items():
            for error in entry.get("errors", []):
                parts.append(f"{entry.get('class_type')} {node_id}: {error.get('message')}: {error.get('details')}")
        failure = self.execution_error()
        if failure:
            parts.append(f"{failure.get('node_type')} {failure.get('node_id')}: {failure.get('exception_type')}: "
                         f"{failure.get('exception_message')}")
        return "\n".join(parts) or self.status


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ComfyServer:
    """``python <COMFYUI_DIR>/main.py --cpu`` on 127.0.0.1 with its folders under ``base_dir``.

    Put model files (or links) under :attr:`models_dir` and pictures under :attr:`input_dir`, then :meth:`start`.
    """

    def __init__(self, comfyui_dir: Path, base_dir: Path, pack_root: Path) -> None:
        self.comfyui_dir = Path(comfyui_dir)
        self.base_dir = Path(base_dir)
        self.models_dir = self.base_dir / "models"
        self.input_dir = self.base_dir / "input"
        self.output_dir = self.base_dir / "output"
        for folder in (self.models_dir, self.input_dir, self.output_dir, self.base_dir / "custom_nodes",
                       self.base_dir / "user"):
            folder.mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / PACK_LINK_NAME
        if not link.exists():
            link.symlink_to(Path(pack_root).resolve(), target_is_directory=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = str(uuid.uuid4())
        self.process: subprocess.Popen | None = None
        self.log_path = self.base_dir / "server.log"

    # -- life cycle -----------------------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0, threads: int | None = None) -> "ComfyServer":
        command = [
            sys.executable, str(self.comfyui_dir / "main.py"), "--cpu", "--listen", "127.0.0.1",
            "--port", str(self.port), "--disable-auto-launch", "--base-directory", str(self.base_dir),
            "--database-url", "sqlite:///:memory:", "--preview-method", "none",
        ]
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        log = self.log_path.open("w")
        self.process = subprocess.Popen(command, cwd=self.comfyui_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, characters: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return "(no server log)"

    # -- HTTP -----------------------------------------------------------------------------------------------------
    def _request(self, path: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get_json(self, path: str):
        status, payload = self._request(path)
        if status != 200:
            raise ServerError(f"GET {path} -> {status}: {payload[:500]!r}")
        return json.loads(payload)

    def node_types(self) -> set[str]:
        return set(self.get_json("/object_info"))

    def queue(self, graph: dict) -> tuple[int, dict]:
        """POST /prompt: (HTTP status, answer) -- 200 with ``prompt_id``, or 400 with ``error``/``node_errors``."""
        status, payload = self._request("/prompt", {"prompt": graph, "client_id": self.client_id})
        return status, json.loads(payload)

    def run(self, graph: dict, timeout: float = 600.0) -> QueuedRun:
        """Queue ``graph`` and wait for its history entry."""
        status, answer = self.queue(graph)
        if status != 200:
            return QueuedRun(None, "rejected", error=answer.get("error"), node_errors=answer.get("node_errors", {}))
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return QueuedRun(prompt_id, entry["status"]["status_str"], outputs=entry.get("outputs", {}),
                                 messages=entry["status"].get("messages", []))
            if self.process and self.process.poll() is not None:
                raise ServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.5)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def download(self, entry: dict) -> bytes:
        """The bytes of one ui output file entry ({filename, subfolder, type}) through GET /view."""
        query = urllib.parse.urlencode({"filename": entry["filename"], "subfolder": entry.get("subfolder", ""),
                                        "type": entry.get("type", "output")})
        status, payload = self._request(f"/view?{query}")
        if status != 200:
            raise ServerError(f"GET /view?{query} -> {status}")
        return payload


def link_file(source: Path, folder: Path, name: str | None = None) -> Path:
    """Symlink ``source`` into ``folder`` (copy where links are not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or source.name)
    if not target.exists():
        try:
            target.symlink_to(source)
        except OSError:
            shutil.copy2(source, target)
    return target
