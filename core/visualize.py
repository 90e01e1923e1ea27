"""Pictures for people: heat-map overlays of quality and defect maps."""

from __future__ import annotations

import torch


def colormap(values: torch.Tensor) -> torch.Tensor:
    """values: (B, H, W) in [0, 1] -> (B, H, W, 3) RGB in [0, 1], a blue (0) - green - yellow - red (1) ramp."""
    v = values.clamp(0, 1)[..., None]
    red = (1.5 - (4 * v - 3).abs()).clamp(0, 1)
    green = (1.5 - (4 * v - 2).abs()).clamp(0, 1)
    blue = (1.5 - (4 * v - 1).abs()).clamp(0, 1)
    return torch.cat([red, green, blue], dim=-1)


def heatmap_overlay(images: torch.Tensor, values: torch.Tensor, opacity: float = 0.5) -> torch.Tensor:
    """Blend a colour-mapped map over the pictures.

    images: (B, H, W, 3) in [0, 1]; values: (B, H, W) in [0, 1] (or (1, H, W), broadcast); opacity in [0, 1].
    Returns (B, H, W, 3) in [0, 1].
    """
    if not 0 <= opacity <= 1:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}.")
    if values.shape[-2:] != images.shape[1:3]:
        raise ValueError(f"Map size {tuple(values.shape[-2:])} differs from image size {tuple(images.shape[1:3])}.")
    colours = colormap(values.to(images))
    return ((1 - opacity) * images[..., :3] + opacity * colours).clamp(0, 1)
