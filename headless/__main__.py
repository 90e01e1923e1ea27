"""``refinery-headless`` without the console command, the same arguments:

- ``python ComfyUI/custom_nodes/ComfyUI-Refinery/headless/__main__.py run ...``: from a clone, nothing installed but
  aiohttp (which ComfyUI's own Python has); works from any folder;
- ``python -m headless run ...`` with the clone as the current folder: the same;
- ``python -m comfyui_refinery.headless run ...``: the installed pack
  (``pip install -e "./ComfyUI-Refinery[headless]"``, which also gives the ``refinery-headless`` command).

From a clone this file loads the clone's root folder as the package ``comfyui_refinery`` (its ``__init__.py``
imports nothing), so the pack's relative imports work whatever the clone folder is called, and the clone runs even
where another copy of the pack is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

PACKAGE = "comfyui_refinery"


def _load_clone_as_package(root: Path) -> None:
    """Import the pack folder ``root`` (holding ``__init__.py``) as the package ``comfyui_refinery``."""
    spec = importlib.util.spec_from_file_location(PACKAGE, root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)


def _cli_module():
    """The ``headless.cli`` module: of the installed package when run with ``-m comfyui_refinery.headless``, else of
    the clone this file is in."""
    if __package__ and __package__.startswith(PACKAGE + "."):
        return importlib.import_module(f"{__package__}.cli")
    here = Path(__file__).resolve().parent
    # run as a file, Python put headless/ itself first on sys.path: its modules are no top-level modules
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    _load_clone_as_package(here.parent)
    return importlib.import_module(f"{PACKAGE}.headless.cli")


def main() -> int:
    try:
        cli = _cli_module()
    except ModuleNotFoundError as error:
        if error.name != "aiohttp":
            raise
        print(f"error: refinery-headless needs aiohttp, which {sys.executable} does not have: install it with "
              f"`{Path(sys.executable).name} -m pip install aiohttp`, or run this with ComfyUI's own Python.",
              file=sys.stderr)
        return 2
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
