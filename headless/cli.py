"""``refinery-headless``: queue API-format workflows on a ComfyUI server and download what they make.

  refinery-headless run refine_image --server http://127.0.0.1:8188 --image photo.png \\
      --set "G-Refine.prompt=a red fox on a rock" --output out/
  refinery-headless batch refine_image --images pictures/ --concurrency 2 --output out/
  refinery-headless batch refine_generated --prompts prompts.txt --prompt-input "Prompt.value" --output out/
  refinery-headless show refine_image      # its nodes and the inputs --set can change (no server needed)

Saved: the output files (SaveImage, under the server's subfolder), the previews of the workflow's end nodes in
previews/ (--previews all|none to change), and each text a node shows (plan summary, score table, AQ report) as
<node title>.txt; `run` also prints the texts.
Without installing the pack: python <path to ComfyUI-Refinery>/headless/__main__.py ... (needs aiohttp only).

Exit codes: 0 all done; 1 a prompt failed or was refused; 2 bad arguments or workflow; 3 server unreachable (a
batch keeps its state: the same command continues it); 130 interrupted (Ctrl-C cancels the prompts this command
queued).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from .batch import BatchState, BatchStopped, items_from_images, items_from_prompts, run_batch, summary_table
from .client import (ComfyClient, ExecutionFailed, ExecutionInterrupted, HeadlessError, PromptLost, PromptRejected,
                     PromptResult, ServerUnreachable)
from .job import Job, run_job
from .outputs import PREVIEW_CHOICES, text_excerpt
from .workflow import (Override, WorkflowError, apply_overrides, describe_workflow, find_node, image_inputs,
                       load_workflow, shipped_workflows)

logger = logging.getLogger("refinery-headless")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="refinery-headless", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="list the shipped workflows, or show one's nodes and settable inputs")
    show.add_argument("workflow", nargs="?", help="API-format workflow file or shipped name (none: list them)")
    for name, help_text in (("run", "queue one workflow"), ("batch", "queue one workflow per image or prompt")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("workflow", help="API-format workflow file, or a shipped name (refine_image, ...)")
        sub.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI URL (default %(default)s)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                         help="set a widget; NODE is a node id or title; VALUE is JSON or text (repeatable)")
        sub.add_argument("--output", type=Path, default=Path("refinery-headless-output"), help="download folder")
        sub.add_argument("--retries", type=int, default=5,
                         help="connection attempts at the start and after a lost connection (default %(default)s)")
        sub.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)")
        sub.add_argument("--previews", choices=PREVIEW_CHOICES, default="ends",
                         help="previews to save in previews/: of the end nodes (default; e.g. the PQ heat map of a "
                              "PreviewImage node), also those nodes show of their own result (all), or none")
        sub.add_argument("--image-input", metavar="NODE.INPUT",
                         help="image-loader input that receives --image / --images (default: the only LoadImage)")
        sub.add_argument("--quiet", action="store_true", help="no progress output")
        if name == "run":
            sub.add_argument("--image", type=Path, help="local picture uploaded for the image input")
        else:
            source = sub.add_mutually_exclusive_group(required=True)
            source.add_argument("--images", type=Path, help="folder of pictures: one prompt each")
            source.add_argument("--prompts", type=Path, help="text file: one prompt per line")
            sub.add_argument("--prompt-input", metavar="NODE.INPUT", help="the text widget each line goes into")
            sub.add_argument("--concurrency", type=int, default=1, help="prompts queued at once (default 1)")
    args = parser.parse_args(argv)
    if args.command == "show":
        return args
    if args.retries < 1:
        parser.error("--retries must be >= 1")
    if args.command == "batch":
        if args.prompts and not args.prompt_input:
            parser.error("--prompts needs --prompt-input '<node title or id>.<input>' (e.g. 'Prompt.value')")
        if args.concurrency < 1:
            parser.error("--concurrency must be >= 1")
    return args


def _image_input(graph: dict, option: str | None) -> tuple[str, str] | None:
    if option:
        node, dot, name = option.rpartition(".")
        if not dot:
            raise WorkflowError(f"--image-input {option!r}: write it as '<node title or id>.<input>'.")
        return find_node(graph, node), name
    loaders = image_inputs(graph)
    if len(loaders) > 1:
        raise WorkflowError(f"The workflow has {len(loaders)} image loaders ({[n for n, _ in loaders]}): choose one with "
                            "--image-input '<node title or id>.image'.")
    return loaders[0] if loaders else None


def _progress_printer(quiet: bool):
    def show(kind: str, data: dict) -> None:
        if quiet:
            return
        if kind == "progress" and data.get("max"):
            print(f"\r  node {data.get('node')}: {data['value']}/{data['max']}", end="", file=sys.stderr, flush=True)
        elif kind == "executing" and data.get("node") is not None:
            print(f"\n  running node {data['node']}", end="", file=sys.stderr, flush=True)
    return show


def _print_texts(result: PromptResult) -> None:
    """Each text the prompt showed, cut to a few lines (the whole text is in its file)."""
    for text in result.texts:
        print(f"\n{text.title} (node {text.node_id}, {text.target}):")
        print(text_excerpt(text.text))


async def _run_one(args, graph: dict) -> int:
    target = None
    if args.image is not None:
        target = _image_input(graph, args.image_input)
        if target is None:
            raise WorkflowError("--image given but the workflow has no image loader: pass --image-input.")
    job = Job(graph, args.output, args.image, target)
    async with ComfyClient(args.server, args.retries, args.backoff) as client:
        try:
            result = await run_job(client, job, _progress_printer(args.quiet), args.previews)
        except (asyncio.CancelledError, KeyboardInterrupt):
            cancelled = await asyncio.shield(client.cancel())
            print(f"\nInterrupted: cancelled {len(cancelled)} queued prompt(s) {cancelled}.", file=sys.stderr)
            return 130
        finally:
            if not args.quiet:
                print(file=sys.stderr)  # ends the progress line, also before an error message
    print(f"Prompt {result.prompt_id} done: {len(result.files)} file(s) in {args.output.resolve()}")
    for path in result.files:
        print(f"  {path}")
    _print_texts(result)
    return 0


async def _run_batch(args, graph: dict) -> int:
    items = items_from_images(args.images) if args.images else items_from_prompts(args.prompts, args.prompt_input)
    image_input = _image_input(graph, args.image_input) if args.images else None
    state = BatchState(args.output, str(args.workflow))
    async with ComfyClient(args.server, args.retries, args.backoff) as client:
        def done(key, entry):
            if not args.quiet:
                print(f"{key}: {entry['status']}", file=sys.stderr)
        try:
            rows = await run_batch(client, graph, items, args.output, args.concurrency, image_input, state, done,
                                   args.previews)
        except BatchStopped as stopped:
            print(summary_table(stopped.rows))
            print(f"error: {stopped}", file=sys.stderr)
            return 3
        except (asyncio.CancelledError, KeyboardInterrupt):
            cancelled = await asyncio.shield(client.cancel())
            print(f"\nInterrupted: cancelled {len(cancelled)} queued prompt(s); run the same command again to "
                  f"resume (state in {state.path}).", file=sys.stderr)
            return 130
    print(summary_table(rows))
    print(f"Outputs in {args.output.resolve()} (state: {state.path})")
    return 1 if any(row["status"] == "failed" for row in rows) else 0


def _show(args) -> int:
    if args.workflow is None:
        print("Shipped workflows (give a name or any API-format file to `run`, `batch` or `show`):")
        for name, path in shipped_workflows().items():
            print(f"  {name:<20} {path}")
    else:
        print(describe_workflow(args.workflow))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.command == "show":
            return _show(args)
        graph = apply_overrides(load_workflow(args.workflow), [Override.parse(text) for text in args.overrides])
        runner = _run_one if args.command == "run" else _run_batch
        return asyncio.run(runner(args, graph))
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    except WorkflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ServerUnreachable as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except (PromptRejected, ExecutionFailed, ExecutionInterrupted, PromptLost) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except HeadlessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
