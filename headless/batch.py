"""Batch runs of one workflow: one queued prompt per image or per prompt line, bounded concurrency, a resumable
state file, and a summary table.

State: ``<output>/headless-state.json`` = ``{"workflow": path, "items": {key: {"status": "done" | "failed",
"prompt_id", "files", "error", "seconds"}}}``, rewritten atomically after every item. A second run with the same
output folder skips the items already ``done`` (``--retry-failed`` is implied: failed items run again).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .client import ComfyClient, HeadlessError, PromptResult
from .workflow import Override, apply_overrides

STATE_FILE = "headless-state.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class BatchItem:
    """key: unique, also the output sub-folder; image: a local picture to upload for the image input, or None;
    overrides: the item's own ``--set``s (e.g. its prompt)."""

    key: str
    image: Path | None
    overrides: tuple[Override, ...]


def items_from_images(folder: Path) -> list[BatchItem]:
    folder = Path(folder)
    if not folder.is_dir():
        raise HeadlessError(f"--images {folder}: not a folder.")
    pictures = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not pictures:
        raise HeadlessError(f"--images {folder}: no pictures ({', '.join(IMAGE_SUFFIXES)}) in it.")
    return [BatchItem(picture.stem, picture, ()) for picture in pictures]


def items_from_prompts(path: Path, prompt_input: str) -> list[BatchItem]:
    """One item per non-empty line of ``path`` (lines starting with # are comments)."""
    node, dot, name = prompt_input.rpartition(".")
    if not dot:
        raise HeadlessError(f"--prompt-input {prompt_input!r}: write it as '<node title or id>.<input>', e.g. 'Prompt.text'.")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise HeadlessError(f"--prompts {path}: cannot read it ({error}).") from error
    prompts = [(number, line.strip()) for number, line in enumerate(lines, 1) if line.strip() and not line.startswith("#")]
    if not prompts:
        raise HeadlessError(f"--prompts {path}: no prompts in it (one per line).")
    return [BatchItem(f"prompt-{number:04d}", None, (Override(node, name, text, f"{prompt_input}={text}"),))
            for number, text in prompts]


class BatchState:
    def __init__(self, folder: Path, workflow: str):
        self.path = Path(folder) / STATE_FILE
        self.data = {"workflow": workflow, "items": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError as error:
                raise HeadlessError(f"{self.path} is damaged ({error}): delete it to start the batch over.") from error

    def done(self, key: str) -> bool:
        return self.data["items"].get(key, {}).get("status") == "done"

    def record(self, key: str, **entry) -> None:
        self.data["items"][key] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.data, indent=2), encoding="utf-8")
        os.replace(temporary, self.path)


async def run_batch(client: ComfyClient, graph: dict, items: list[BatchItem], output: Path, concurrency: int,
                    image_input: tuple[str, str] | None, state: BatchState, on_done=None) -> list[dict]:
    """Queue every item not yet done, at most ``concurrency`` at a time; returns one summary row per item."""
    if concurrency < 1:
        raise HeadlessError(f"--concurrency must be >= 1, got {concurrency}.")
    if any(item.image is not None for item in items) and image_input is None:
        raise HeadlessError("The workflow has no image-loader input to put the batch's pictures into: pass "
                            "--image-input '<node title or id>.image'.")
    # every item's graph is built (and its overrides checked) before anything is queued
    graphs = {}
    for item in items:
        overrides = list(item.overrides)
        if item.image is not None:
            overrides.append(Override(image_input[0], image_input[1], None, f"{image_input[0]}.{image_input[1]}"))
        graphs[item.key] = apply_overrides(graph, overrides) if overrides else graph
    semaphore = asyncio.Semaphore(concurrency)
    rows: list[dict] = []

    async def one(item: BatchItem) -> None:
        if state.done(item.key):
            rows.append({"item": item.key, **state.data["items"][item.key], "status": "skipped (done before)"})
            return
        async with semaphore:
            started = time.monotonic()
            item_graph = graphs[item.key]
            try:
                if item.image is not None:
                    item_graph = json.loads(json.dumps(item_graph))
                    item_graph[image_input[0]]["inputs"][image_input[1]] = await client.upload_image(item.image)
                result: PromptResult = await client.run(item_graph, Path(output) / item.key)
                entry = {"status": "done", "prompt_id": result.prompt_id, "files": [str(f) for f in result.files],
                         "error": None, "seconds": round(time.monotonic() - started, 2)}
            except HeadlessError as error:
                entry = {"status": "failed", "prompt_id": None, "files": [], "error": str(error),
                         "seconds": round(time.monotonic() - started, 2)}
            state.record(item.key, **entry)
            rows.append({"item": item.key, **entry})
            if on_done:
                on_done(item.key, entry)

    await asyncio.gather(*(one(item) for item in items))
    order = {item.key: index for index, item in enumerate(items)}
    return sorted(rows, key=lambda row: order[row["item"]])


def summary_table(rows: list[dict]) -> str:
    """A plain-text table: item, status, seconds, files or error."""
    lines = [f"{'item':<24} {'status':<22} {'seconds':>8}  result", "-" * 80]
    for row in rows:
        result = row.get("error") or ", ".join(Path(f).name for f in row.get("files", [])) or "-"
        lines.append(f"{row['item'][:24]:<24} {row['status'][:22]:<22} {row.get('seconds') or 0:>8.1f}  "
                     f"{result.splitlines()[0][:120] if result else '-'}")
    done = sum(row["status"] == "done" for row in rows)
    failed = sum(row["status"] == "failed" for row in rows)
    lines.append(f"{done} done, {failed} failed, {len(rows) - done - failed} skipped")
    return "\n".join(lines)
