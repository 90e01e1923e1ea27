"""``refinery-headless``: queue API-format workflows on a ComfyUI server and download what they make.

  refinery-headless run refine_image --server http://127.0.0.1:8188 --image photo.png \\
      --set "G-Refine.prompt=a red fox on a rock" --output out/
  refinery-headless batch refine_image --images pictures/ --concurrency 2 --output out/
  refinery-headless batch refine_generated --prompts prompts.txt --prompt-input "Prompt.text" --output out/

Exit codes: 0 all done; 1 a prompt failed or was refused; 2 bad arguments or workflow; 3 server unreachable;
130 interrupted (Ctrl-C cancels the prompts this command queued).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from .batch import BatchState, items_from_images, items_from_prompts, run_batch, summary_table
from .client import ComfyClient, ExecutionFailed, ExecutionInterrupted, HeadlessError, PromptRejected, ServerUnreachable
from .workflow import Override, WorkflowError, apply_overrides, find_node, image_inputs, load_workflow

logger = logging.getLogger("refinery-headless")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="refinery-headless", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "queue one workflow"), ("batch", "queue one workflow per image or prompt")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("workflow", help="API-format workflow file, or a shipped name (refine_image, ...)")
        sub.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI URL (default %(default)s)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                         help="set a widget; NODE is a node id or title; VALUE is JSON or text (repeatable)")
        sub.add_argument("--output", type=Path, default=Path("refinery-headless-output"), help="download folder")
        sub.add_argument("--retries", type=int, default=5, help="connection attempts before giving up")
        sub.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)")
        sub.add_argument("--include-previews", action="store_true", help="also download temp preview images")
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
    if args.retries < 1:
        parser.error("--retries must be >= 1")
    if args.command == "batch":
        if args.prompts and not args.prompt_input:
            parser.error("--prompts needs --prompt-input '<node title or id>.<input>' (e.g. 'Prompt.text')")
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


async def _run_one(args, graph: dict) -> int:
    async with ComfyClient(args.server, args.retries, args.backoff) as client:
        try:
            if args.image is not None:
                target = _image_input(graph, args.image_input)
                if target is None:
                    raise WorkflowError("--image given but the workflow has no image loader: pass --image-input.")
                graph[target[0]]["inputs"][target[1]] = await client.upload_image(args.image)
            result = await client.run(graph, args.output, _progress_printer(args.quiet), args.include_previews)
        except (asyncio.CancelledError, KeyboardInterrupt):
            cancelled = await asyncio.shield(client.cancel())
            print(f"\nInterrupted: cancelled {len(cancelled)} queued prompt(s) {cancelled}.", file=sys.stderr)
            return 130
    if not args.quiet:
        print(file=sys.stderr)
    print(f"Prompt {result.prompt_id} done: {len(result.files)} file(s) in {args.output.resolve()}")
    for path in result.files:
        print(f"  {path}")
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
            rows = await run_batch(client, graph, items, args.output, args.concurrency, image_input, state, done)
        except (asyncio.CancelledError, KeyboardInterrupt):
            cancelled = await asyncio.shield(client.cancel())
            print(f"\nInterrupted: cancelled {len(cancelled)} queued prompt(s); run the same command again to "
                  f"resume (state in {state.path}).", file=sys.stderr)
            return 130
    print(summary_table(rows))
    print(f"Outputs in {args.output.resolve()} (state: {state.path})")
    return 1 if any(row["status"] == "failed" for row in rows) else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
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
    except (PromptRejected, ExecutionFailed, ExecutionInterrupted) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except HeadlessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
