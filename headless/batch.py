"""Batch runs of one workflow: one queued prompt per image or per prompt line, bounded concurrency, a resumable
state file, and a summary table.

State: ``<output>/headless-state.json`` = ``{"version": 2, "workflow": path, "items": {key: {"status": "done" |
"failed", "fingerprint", "prompt_id", "files", "error", "seconds"}}}``, rewritten atomically after every item.
``fingerprint`` (``item_fingerprint``) stands for what the item runs: the workflow after every override and the
picture's bytes. A second run with the same output folder skips the items ``done`` with the same fingerprint; items
whose workflow, ``--set`` values or picture changed run again (said once on stderr), failed items run again.
State files of version 1 (no ``version`` key, no fingerprints: refinery-headless before fingerprints) are read: their
items cannot be matched to what they ran, so all of them run again (said on stderr).

When the server goes away mid-batch, the item in flight waits for it (``job.run_job``: the back-off of the start);
if it stays away the batch stops without starting more items and raises BatchStopped: the items not run are not
recorded, so the same command continues the batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .client import ComfyClient, HeadlessError, ServerUnreachable
from ..trainers.common.atomic import atomic_write_text
from .job import Job, run_job
from .workflow import Override, apply_overrides

logger = logging.getLogger(__name__)

STATE_FILE = "headless-state.json"
STATE_VERSION = 2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class BatchStopped(ServerUnreachable):
    """The server went away mid-batch and did not come back. rows: the summary rows of the items that ended."""

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows


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
        raise HeadlessError(f"--prompt-input {prompt_input!r}: write it as '<node title or id>.<input>', e.g. "
                            "'Prompt.value'.")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise HeadlessError(f"--prompts {path}: cannot read it ({error}).") from error
    prompts = [(number, line.strip()) for number, line in enumerate(lines, 1) if line.strip() and not line.startswith("#")]
    if not prompts:
        raise HeadlessError(f"--prompts {path}: no prompts in it (one per line).")
    return [BatchItem(f"prompt-{number:04d}", None, (Override(node, name, text, f"{prompt_input}={text}"),))
            for number, text in prompts]


def _whole_floats_as_ints(value):
    """``value`` with every float that is a whole number written as an int (7.0 -> 7), in lists and dicts too."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole_floats_as_ints(item) for item in value]
    if isinstance(value, dict):
        return {key: _whole_floats_as_ints(item) for key, item in value.items()}
    return value


def canonical_graph(graph: dict) -> str:
    """The API graph as canonical JSON: keys sorted, no spaces, whole floats as ints (``--set cfg=7`` on a file
    holding 7.0), ``_meta`` (titles, which the server ignores) left out. Graphs that run the same give the same
    string."""
    bare = {node_id: {key: value for key, value in node.items() if key != "_meta"} for node_id, node in graph.items()}
    return json.dumps(_whole_floats_as_ints(bare), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def item_fingerprint(graph: dict, image: Path | None) -> str:
    """sha256 (hex) of what an item runs: ``canonical_graph(graph)`` (the workflow after every override, the image
    input left empty) and the sha256 of the picture's bytes (or nothing without a picture)."""
    digest = hashlib.sha256(canonical_graph(graph).encode("utf-8"))
    digest.update(b"\0picture:")
    if image is not None:
        try:
            digest.update(hashlib.sha256(Path(image).read_bytes()).hexdigest().encode("ascii"))
        except OSError as error:
            raise HeadlessError(f"Cannot read the picture {image} ({error}).") from error
    return digest.hexdigest()


class BatchState:
    """The state file of a batch (see the module docstring). path: ``<folder>/headless-state.json``; data: its
    content (version 2)."""

    def __init__(self, folder: Path, workflow: str):
        self.path = Path(folder) / STATE_FILE
        self.data = {"version": STATE_VERSION, "workflow": workflow, "items": {}}
        if self.path.is_file():
            self.data = self._read()

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise HeadlessError(f"{self.path} is damaged ({error}): delete it to start the batch over.") from error
        if not isinstance(data, dict) or not isinstance(data.get("items"), dict):
            raise HeadlessError(f"{self.path} is not a refinery-headless state file (no 'items'): delete it or "
                                "choose another --output folder.")
        version = data.get("version", 1)
        if version == STATE_VERSION:
            return data
        if version == 1:
            done = sorted(key for key, entry in data["items"].items() if (entry or {}).get("status") == "done")
            if done:
                logger.warning("%s was written by an older refinery-headless that did not record what each item ran: "
                               "its %d done item(s) cannot be told apart from changed ones and run again (their "
                               "earlier outputs stay in place).", self.path, len(done))
            items = {key: {**(entry or {}), "fingerprint": None} for key, entry in data["items"].items()}
            return {"version": STATE_VERSION, "workflow": data.get("workflow"), "items": items}
        raise HeadlessError(f"{self.path} has state version {version!r}, which this refinery-headless does not read "
                            f"(it reads {STATE_VERSION} and 1): update ComfyUI-Refinery, or choose another --output "
                            "folder.")

    def entry(self, key: str) -> dict:
        return self.data["items"].get(key) or {}

    def done(self, key: str, fingerprint: str) -> bool:
        """Whether ``key`` was done with the same workflow, settings and picture."""
        entry = self.entry(key)
        return entry.get("status") == "done" and entry.get("fingerprint") == fingerprint

    def changed(self, key: str, fingerprint: str) -> bool:
        """Whether ``key`` was done, but with another workflow, other settings or another picture (entries of a
        version-1 file, without a fingerprint, are not known to have changed: ``_read`` warns of them)."""
        entry = self.entry(key)
        return entry.get("status") == "done" and entry.get("fingerprint") not in (None, fingerprint)

    def record(self, key: str, **entry) -> None:
        self.data["items"][key] = entry
        atomic_write_text(self.path, json.dumps(self.data, indent=2))


def item_graphs(graph: dict, items: list[BatchItem], image_input: tuple[str, str] | None) -> dict[str, dict]:
    """Each item's graph: ``graph`` with its overrides applied and the image input (if any) left empty for the
    upload. Built for all items before anything is queued, so that a bad override stops the batch at once."""
    if any(item.image is not None for item in items) and image_input is None:
        raise HeadlessError("The workflow has no image-loader input to put the batch's pictures into: pass "
                            "--image-input '<node title or id>.image'.")
    graphs = {}
    for item in items:
        overrides = list(item.overrides)
        if item.image is not None:
            overrides.append(Override(image_input[0], image_input[1], None, f"{image_input[0]}.{image_input[1]}"))
        graphs[item.key] = apply_overrides(graph, overrides) if overrides else graph
    return graphs


def _stopped_message(client: ComfyClient, error: ServerUnreachable, rows: list[dict], total: int,
                     state: BatchState) -> str:
    ended = len(rows)
    return (f"The ComfyUI server at {client.url} went away during the batch and did not come back ({error}). "
            f"{ended} of {total} item(s) ended (done, failed or skipped), {total - ended} not run. The state is "
            f"saved in {state.path}: once the server is up, run the same command again to continue.")


async def run_batch(client: ComfyClient, graph: dict, items: list[BatchItem], output: Path, concurrency: int,
                    image_input: tuple[str, str] | None, state: BatchState, on_done=None,
                    previews: str = "ends") -> list[dict]:
    """Queue every item not yet done (or changed since), at most ``concurrency`` at a time; returns one summary row
    per item. Raises BatchStopped when the server went away and stayed away."""
    if concurrency < 1:
        raise HeadlessError(f"--concurrency must be >= 1, got {concurrency}.")
    graphs = item_graphs(graph, items, image_input)
    fingerprints = {item.key: item_fingerprint(graphs[item.key], item.image) for item in items}
    changed = [item.key for item in items if state.changed(item.key, fingerprints[item.key])]
    if changed:
        logger.warning("%d item(s) done before with another workflow, other --set values or another picture run "
                       "again: %s", len(changed), ", ".join(changed[:10]) + (", ..." if len(changed) > 10 else ""))
    semaphore = asyncio.Semaphore(concurrency)
    rows: list[dict] = []
    lost: list[ServerUnreachable] = []  # set once the server stayed away: no item starts after that

    async def one(item: BatchItem) -> None:
        fingerprint = fingerprints[item.key]
        if state.done(item.key, fingerprint):
            rows.append({"item": item.key, **state.entry(item.key), "status": "skipped (done before)"})
            return
        async with semaphore:
            if lost:
                return
            started = time.monotonic()
            job = Job(graphs[item.key], Path(output) / item.key, item.image, image_input)
            try:
                result = await run_job(client, job, previews=previews)
                entry = {"status": "done", "fingerprint": fingerprint, "prompt_id": result.prompt_id,
                         "files": [str(f) for f in result.files], "error": None}
            except ServerUnreachable as error:
                lost.append(error)
                return  # not recorded: the next run starts it again
            except HeadlessError as error:
                entry = {"status": "failed", "fingerprint": fingerprint, "prompt_id": job.prompt_id, "files": [],
                         "error": str(error)}
            entry["seconds"] = round(time.monotonic() - started, 2)
            state.record(item.key, **entry)
            rows.append({"item": item.key, **entry})
            if on_done:
                on_done(item.key, entry)

    await asyncio.gather(*(one(item) for item in items))
    order = {item.key: index for index, item in enumerate(items)}
    rows.sort(key=lambda row: order[row["item"]])
    if lost:
        raise BatchStopped(_stopped_message(client, lost[0], rows, len(items), state), rows)
    return rows


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
