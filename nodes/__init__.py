"""ComfyUI V3 nodes of ComfyUI-Refinery: thin adapters over ``core``. Imported only inside ComfyUI."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import keep_better, quality_maps, refiner, scoring
from .comfy_io import register_model_folders

__all__ = ["RefineryExtension", "register_model_folders"]


class RefineryExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*quality_maps.NODES, *refiner.NODES, *keep_better.NODES, *scoring.NODES]
