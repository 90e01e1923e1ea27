"""ComfyUI-Refinery: find the low-quality and misaligned regions of generated images and fix only those.

Loaded two ways:
- by ComfyUI from ``custom_nodes/``: ComfyUI calls :func:`comfy_entrypoint` (V3 node API);
- as the pip package ``comfyui_refinery`` by scripts and tests, which use ``core`` and never import ComfyUI.

Nothing ComfyUI-specific is imported at module level, so the package imports outside ComfyUI.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    """ComfyUI V3 entry point: registers the model folders and returns the node extension."""
    from .nodes import RefineryExtension, register_model_folders

    register_model_folders()
    return RefineryExtension()
