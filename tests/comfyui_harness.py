"""Run the pack inside a real ComfyUI, in-process: load it as a custom node and execute API-format graphs.

ComfyUI keeps its state in modules (``folder_paths``, ``nodes.NODE_CLASS_MAPPINGS``, ``comfy.cli_args.args``),
so there is one :class:`ComfyHarness` per test session (the ``comfy_harness`` fixture in ``conftest.py``).
Nothing here fakes a model or a result: the graphs run through ComfyUI's own validation and executor; the only
stand-in is :class:`RecordingServer`, which records the messages the executor would send to a browser.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REFINERY_NODE_IDS = (
    "RefineryQualityModelLoader",
    "RefineryQualityPromptsLoader",
    "RefineryPQMap",
    "RefineryAQMap",
    "RefineryRefineMask",
    "RefineryRefinePlan",
    "RefineryMaskedRedenoise",
    "RefineryGlobalRedenoise",
    "RefineryGRefine",
    "RefineryKeepBetter",
    "RefineryRewardModelLoader",
    "RefineryScoreImages",
    "RefineryRankImages",
    "RefineryRewardWinRate",
)
PACK_LINK_NAME = "ComfyUI-Refinery"


def find_comfyui(pack_root: Path) -> Path | None:
    """ComfyUI's root: ``$COMFYUI_DIR``, else the parent of a ``custom_nodes`` folder above ``pack_root`` that has
    ``main.py`` and ``comfy/``. None when neither is found."""

    def is_comfyui(folder: Path) -> bool:
        return (folder / "main.py").is_file() and (folder / "comfy").is_dir()

    env = os.environ.get("COMFYUI_DIR")
    if env:
        folder = Path(env).expanduser().resolve()
        return folder if is_comfyui(folder) else None
    # the pack may sit in custom_nodes/ through a symlink: look from the unresolved path and the shell's $PWD too
    starts = [pack_root.absolute(), pack_root.resolve(), Path(os.environ.get("PWD") or os.getcwd())]
    for start in starts:
        for parent in (start, *start.parents):
            if parent.name == "custom_nodes" and is_comfyui(parent.parent):
                return parent.parent
    return None


class RecordingServer:
    """The server-like object ``execution.PromptExecutor`` talks to: records every message it sends."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[Any, Any]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


@dataclass
class GraphResult:
    """What one :meth:`ComfyHarness.run_graph` call gave.

    success: validation passed and the executor finished without an error.
    validation_error: ComfyUI's prompt-level error (None when valid); node_errors: its per-node errors.
    outputs: the ``history_result`` ui outputs, node id -> {"images": [...], "text": [...], ...}.
    messages: (event, data) as recorded by the server stand-in (execution_start, executing, executed,
    execution_cached, execution_error, execution_success, progress_state, ...).
    """

    prompt_id: str
    success: bool
    validation_error: dict | None = None
    node_errors: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    messages: list = field(default_factory=list)

    def events(self, name: str) -> list[dict]:
        return [data for event, data in self.messages if event == name]

    @property
    def execution_error(self) -> dict | None:
        errors = self.events("execution_error")
        return errors[0] if errors else None

    def error_text(self) -> str:
        """Every error message of this run (validation and execution) in one string, for keyword checks."""
        parts = []
        if self.validation_error:
            parts += [str(self.validation_error.get("message", "")), str(self.validation_error.get("details", ""))]
        for node_id, entry in self.node_errors.items():
            for error in entry.get("errors", []):
                parts.append(f"{entry.get('class_type')} {node_id}: {error.get('message')}: {error.get('details')}")
        error = self.execution_error
        if error:
            parts.append(f"{error.get('node_type')} {error.get('node_id')}: {error.get('exception_type')}: "
                         f"{error.get('exception_message')}")
        return "\n".join(parts)

    def did_run(self, node_id: str) -> bool:
        return any(data.get("node") == node_id for data in self.events("executing"))


class ComfyHarness:
    """One in-process ComfyUI on CPU with its folders under ``base_dir`` and this pack loaded as a custom node.

    Create the model files under :attr:`models_dir` before :meth:`start` (the loader's combo options are also
    rebuilt at validation, so later files work too).
    """

    def __init__(self, comfyui_dir: Path, base_dir: Path, pack_root: Path) -> None:
        self.comfyui_dir = Path(comfyui_dir)
        self.base_dir = Path(base_dir)
        self.pack_root = Path(pack_root).resolve()
        self.models_dir = self.base_dir / "models"
        self.input_dir = self.base_dir / "input"
        self.output_dir = self.base_dir / "output"
        self.temp_dir = self.base_dir / "temp"
        self.custom_nodes_dir = self.base_dir / "custom_nodes"
        for folder in (self.models_dir / "quality_clip", self.models_dir / "quality_prompts",
                       self.models_dir / "reward_models", self.input_dir,
                       self.output_dir, self.temp_dir, self.custom_nodes_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.server = RecordingServer()
        self.executor = None
        self.import_warnings: list[str] = []
        self.builtin_import_failures: list[str] = []
        self.started = False

    # -- start-up -----------------------------------------------------------------------------------------------
    def start(self) -> "ComfyHarness":
        """Configure ComfyUI for CPU, point its folders here, load the custom nodes, make the executor."""
        if self.started:
            return self
        root = str(self.comfyui_dir)
        if root not in sys.path:
            sys.path.insert(0, root)
        import comfy.options

        comfy.options.enable_args_parsing(False)  # parse an empty argv, never pytest's
        from comfy.cli_args import args

        if "comfy.model_management" in sys.modules and not args.cpu:
            raise RuntimeError("comfy.model_management was imported before the harness set args.cpu")
        args.cpu = True
        args.disable_auto_launch = True
        args.disable_all_custom_nodes = False
        args.enable_manager = False
        args.cache_none = False
        args.cache_lru = 0
        args.cache_ram = 0

        import folder_paths

        folder_paths.set_output_directory(str(self.output_dir))
        folder_paths.set_input_directory(str(self.input_dir))
        folder_paths.set_temp_directory(str(self.temp_dir))
        for name in ("quality_clip", "quality_prompts", "reward_models"):
            folder_paths.add_model_folder_path(name, str(self.models_dir / name), is_default=True)
        self._link_pack(folder_paths)

        # main.py imports ComfyUI's top-level ``utils`` package before ``nodes``, which puts ``comfy/`` first on
        # sys.path (where ``comfy/utils.py`` would then shadow it, and comfy_extras importing ``server`` fails).
        import utils.extra_config  # noqa: F401
        import utils.install_util  # noqa: F401

        import execution
        import nodes

        handler = _ListHandler()
        logging.getLogger().addHandler(handler)
        try:
            self.builtin_import_failures = list(
                asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False)) or []
            )
        finally:
            logging.getLogger().removeHandler(handler)
        self.import_warnings = handler.records
        self.executor = execution.PromptExecutor(
            self.server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0}
        )
        self.started = True
        return self

    def _link_pack(self, folder_paths) -> None:
        """Make the pack a custom node: a symlink in our custom_nodes folder, unless ComfyUI already has it."""
        for folder in folder_paths.get_folder_paths("custom_nodes"):
            if not os.path.isdir(folder):
                continue
            for entry in os.listdir(folder):
                if Path(folder, entry).resolve() == self.pack_root:
                    self.pack_module_path = os.path.join(folder, entry)
                    return
        link = self.custom_nodes_dir / PACK_LINK_NAME
        if not link.exists():
            link.symlink_to(self.pack_root, target_is_directory=True)
        folder_paths.add_model_folder_path("custom_nodes", str(self.custom_nodes_dir))
        self.pack_module_path = str(link)

    def pack_import_failures(self) -> list[str]:
        """Warnings ComfyUI logged while importing this pack ("Cannot import ...", entrypoint errors)."""
        keys = (self.pack_module_path, PACK_LINK_NAME, str(self.pack_root))
        return [
            message
            for message in self.import_warnings
            if any(key in message for key in keys)
            and ("Cannot import" in message or "comfy_entrypoint" in message or "IMPORT FAILED" in message)
        ]

    # -- running graphs -----------------------------------------------------------------------------------------
    def node_class(self, class_type: str):
        import nodes

        return nodes.NODE_CLASS_MAPPINGS[class_type]

    def run_graph(self, graph, outputs: list[str] | None = None) -> GraphResult:
        """Validate and execute an API-format graph (a dict, or a ``GraphBuilder``) on the session's executor.

        outputs: the output node ids to run (default: every output node that passed validation).
        """
        import execution

        if hasattr(graph, "finalize"):
            graph = graph.finalize()
        prompt_id = str(uuid.uuid4())
        valid, error, good_outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, graph, outputs))
        if not valid:
            return GraphResult(prompt_id, False, validation_error=error, node_errors=node_errors)
        self.server.messages = []
        self.server.last_prompt_id = prompt_id
        self.executor.execute(graph, prompt_id, {"client_id": "refinery-tests"}, list(good_outputs))
        success = self.executor.success and any(event == "execution_success" for event, _ in self.server.messages)
        return GraphResult(
            prompt_id,
            success,
            node_errors=node_errors,
            outputs=dict(self.executor.history_result.get("outputs", {})),
            messages=list(self.server.messages),
        )

    def output_files(self, result: GraphResult, node_id: str, key: str = "images") -> list[Path]:
        """Paths on disk of the files a node reported in its ui output (SaveImage: output/, previews: temp/)."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        entries = result.outputs.get(node_id, {}).get(key, [])
        return [roots[entry["type"]] / entry.get("subfolder", "") / entry["filename"] for entry in entries]


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append(record.getMessage())
        except Exception:  # a broken log call must not break start-up
            self.records.append(str(record.msg))
