"""One graph's way through a ComfyUI server: upload its picture, queue it, follow it, save what it made; carried over
a dropped connection or a restarted server.

Each step done is kept in the ``Job``, so after a lost connection the job reconnects (``ComfyClient.reconnect``:
the same tries and back-off as at the start) and continues where it stopped: a prompt still known to the server is
followed on, one the server forgot (it restarted), or whose previews it deleted on restarting, is queued again. When
the server stays away, ServerUnreachable propagates: the caller stops (a batch keeps its state, so that a re-run
continues).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .client import ComfyClient, PromptLost, PromptResult, ServerUnreachable

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """graph: the API graph to queue; folder: where its outputs go; image: a local picture uploaded into
    ``image_input`` (node id, input name) first, or None. uploaded, prompt_id, outputs: the steps done so far."""

    graph: dict
    folder: Path
    image: Path | None = None
    image_input: tuple[str, str] | None = None
    uploaded: str | None = None
    prompt_id: str | None = None
    outputs: dict | None = None

    def queued_graph(self) -> dict:
        """The graph as queued: with the uploaded picture's server name in the image input."""
        if self.uploaded is None:
            return self.graph
        node_id, name = self.image_input
        return {**self.graph, node_id: {**self.graph[node_id],
                                        "inputs": {**self.graph[node_id]["inputs"], name: self.uploaded}}}


async def _advance(client: ComfyClient, job: Job, on_progress, previews: str) -> PromptResult:
    """Run the steps of ``job`` not done yet."""
    if job.image is not None and job.uploaded is None:
        job.uploaded = await client.upload_image(job.image)
    graph = job.queued_graph()
    if job.prompt_id is None:
        job.prompt_id = await client.queue(graph)
    if job.outputs is None:
        job.outputs = await client.wait(job.prompt_id, graph, on_progress)
    files, texts = await client.save_outputs(job.outputs, graph, job.folder, previews)
    return PromptResult(job.prompt_id, job.outputs, files, texts)


async def run_job(client: ComfyClient, job: Job, on_progress: Callable[[str, dict], None] | None = None,
                  previews: str = "ends") -> PromptResult:
    """Upload, queue, follow and save ``job``. After a lost connection it reconnects and continues, a prompt the
    server forgot is queued again: at most ``client.retries`` such recoveries. Raises ServerUnreachable when the
    server stays away, PromptLost after the last recovery, PromptRejected, ExecutionFailed, ExecutionInterrupted or
    HeadlessError for the prompt's own failures."""
    recoveries = 0
    while True:
        connection = client.connection
        try:
            return await _advance(client, job, on_progress, previews)
        except (PromptLost, ServerUnreachable) as error:
            recoveries += 1
            if recoveries > client.retries:
                raise
            if isinstance(error, PromptLost):
                logger.warning("%s Queueing it again.", error)
                job.prompt_id, job.outputs = None, None
            else:
                logger.warning("%s Waiting for the server to come back.", error)
                await client.reconnect(connection)  # raises ServerUnreachable when the server stays away
