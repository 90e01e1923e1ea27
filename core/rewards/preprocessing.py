"""Differentiable image preprocessing of the reward models, in torch.

Every reward model sees its images the way its own project fed them at training and publication time:

- open_clip (CLIPScore, aesthetic tower, our trained rewards): ``open_clip.image_transform(size, is_train=False)``:
  torchvision ``Resize(size)`` of the *shortest* side (bicubic; antialiased on PIL images), ``CenterCrop(size)``
  with the offset ``int(round((H - size) / 2))``, then ``Normalize`` (OpenAI mean/std unless the model has its own).
- HPSv2: its open_clip fork's ``preprocess_val`` (``resize_longest_max=True``, class ``ResizeMaxSize``): the
  *longest* side to ``size`` (bicubic), then padded to a square with black (0) centred; open_clip's
  ``resize_mode="longest"`` is the same transform.
- transformers ``CLIPImageProcessor`` (PickScore): resize the shortest edge to ``size["shortest_edge"]`` (bicubic),
  ``center_crop`` to ``crop_size`` with the offset ``(H - size) // 2`` (floor: one pixel off torchvision's rounding
  when ``H - size`` is odd and ``(H - size) / 2`` rounds up), rescale by 1/255, normalise.

All three compute the resized length as torchvision / transformers do, ``int(size * long / short)`` (truncated).

Here the same steps run on float tensors: ``F.interpolate(mode="bicubic", antialias=True)`` uses PIL's bicubic kernel
(a = -0.5) with PIL's antialiasing support, and the result is clamped to [0, 1] as PIL's uint8 saturates. The only
remaining difference is PIL's uint8 rounding of the resized image: on test images the mean absolute difference is
about 0.005 in normalised units (about 0.3/255 of a pixel value), at most about 0.06; ``tests/test_rewards.py``
holds the mean below 0.01 and the maximum below 0.1. Everything here is differentiable in the pixels (the clamp
has zero gradient where a bicubic overshoot is clipped).

Layouts: ComfyUI IMAGE ``(B, H, W, C)`` float in [0, 1] comes in; ``(B, 3, h, w)`` normalised tower input goes out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ("shortest", "longest")
CROP_OFFSETS = ("round", "floor")
INTERPOLATIONS = ("bicubic", "bilinear")
PIL_RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}
"""PIL resampling codes found in transformers ``preprocessor_config.json`` files ("resample")."""

ALPHA_BACKGROUND = 1.0
"""Background that RGBA images are composited over: white (see :func:`rgb_pixels`)."""


def rgb_pixels(images: torch.Tensor, alpha_background: float = ALPHA_BACKGROUND) -> torch.Tensor:
    """ComfyUI IMAGE ``(B, H, W, C)`` float in [0, 1] -> ``(B, 3, H, W)`` RGB pixels, differentiable.

    C = 3 is used as is. C = 1 (grayscale) is replicated to the three channels. C = 4 (RGBA, as some loaders return)
    is composited over a flat ``alpha_background`` (default white, 1.0): ``rgb * a + background * (1 - a)``, i.e. the
    image as it looks on a white page. The reference scorers' PIL ``convert("RGB")`` would instead drop the alpha
    channel and score whatever colour hides under transparent pixels; opaque RGBA images score the same either way.
    Any other layout raises ValueError naming the shape.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"Images must be a torch.Tensor of shape (B, H, W, 3), got {type(images).__name__}.")
    if images.ndim != 4:
        raise ValueError(
            f"Images must have shape (B, H, W, C) (ComfyUI IMAGE layout), got {tuple(images.shape)}. Add a batch "
            f"dimension with images.unsqueeze(0) for a single image."
        )
    if images.shape[0] == 0:
        raise ValueError("There are no images to score (the batch has 0 images).")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"Images of shape {tuple(images.shape)} have no pixels.")
    if not images.is_floating_point():
        raise ValueError(
            f"Images must be float in [0, 1] (ComfyUI IMAGE), got dtype {images.dtype}. Divide uint8 pixels by 255."
        )
    channels = images.shape[-1]
    pixels = images.permute(0, 3, 1, 2)  # BHWC -> BCHW
    if channels == 3:
        return pixels
    if channels == 1:
        return pixels.expand(-1, 3, -1, -1)
    if channels == 4:
        color, alpha = pixels[:, :3], pixels[:, 3:4]
        return color * alpha + alpha_background * (1.0 - alpha)
    raise ValueError(
        f"Images must have 3 channels (RGB), or 1 (grayscale) or 4 (RGBA) to convert; got {channels} channels in "
        f"shape {tuple(images.shape)}."
    )


def shortest_side_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) after resizing so the image covers ``target`` (h, w) with its aspect ratio kept.

    Square targets: the shortest side becomes ``target`` and the longest ``int(target * long / short)``, exactly as
    torchvision ``Resize(int)`` and transformers' ``shortest_edge`` compute it. Non-square targets follow open_clip's
    ``ResizeKeepRatio`` (ratio = the smaller of the two side ratios, sizes rounded).
    """
    target_h, target_w = target
    if target_h == target_w:
        short, long = min(height, width), max(height, width)
        new_short, new_long = target_h, int(target_h * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)
    ratio = min(height / target_h, width / target_w)
    return max(1, round(height / ratio)), max(1, round(width / ratio))


def longest_side_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) after resizing so the image fits inside ``target`` (h, w) with its aspect ratio kept
    (open_clip ``ResizeKeepRatio(longest=1)``, HPSv2 ``ResizeMaxSize``; sizes rounded, at least 1)."""
    ratio = max(height / target[0], width / target[1])
    return max(1, round(height / ratio)), max(1, round(width / ratio))


def resize(pixels: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, h, w) in [0, 1]: antialiased resize (PIL's kernels), clamped as PIL's uint8
    would be. Returns the input unchanged when the size already matches (PIL returns an identical copy)."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    resized = F.interpolate(pixels, size=size, mode=interpolation, align_corners=False, antialias=True)
    return resized.clamp(0.0, 1.0)


def center_crop_or_pad(
    pixels: torch.Tensor, size: tuple[int, int], crop_offset: str = "round", fill: float = 0.0
) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, h, w): pad with ``fill`` where the image is smaller than ``size`` (left/top get
    ``(h - H) // 2``, as torchvision and open_clip pad), then crop the centre.

    crop_offset: "round" = torchvision ``CenterCrop`` (``int(round((H - h) / 2))``, Python's half-to-even rounding);
    "floor" = transformers ``center_crop`` (``(H - h) // 2``).
    """
    target_h, target_w = size
    height, width = pixels.shape[-2:]
    pad_h, pad_w = max(target_h - height, 0), max(target_w - width, 0)
    if pad_h or pad_w:
        padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)  # left, right, top, bottom
        pixels = F.pad(pixels, padding, value=fill)
        height, width = pixels.shape[-2:]
    if crop_offset == "round":
        top, left = round((height - target_h) / 2.0), round((width - target_w) / 2.0)
    else:
        top, left = (height - target_h) // 2, (width - target_w) // 2
    return pixels[..., top : top + target_h, left : left + target_w]


@dataclass(frozen=True)
class ImagePreprocess:
    """One reward model's preprocessing: resize, crop or pad to ``size``, normalise.

    size: (h, w) tower input. mean, std: per-channel normalisation. resize_mode: "shortest" (resize the shortest
    side, centre-crop: open_clip, CLIPImageProcessor) or "longest" (resize the longest side, centre-pad with
    ``fill``: HPSv2). crop_offset: see :func:`center_crop_or_pad`. interpolation: "bicubic" or "bilinear".
    fill: padding value in [0, 1] pixel units (before normalisation; 0 = black as in HPSv2).
    """

    size: tuple[int, int]
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resize_mode: str = "shortest"
    crop_offset: str = "round"
    interpolation: str = "bicubic"
    fill: float = 0.0

    def __post_init__(self):
        for field_name, value, allowed in (
            ("resize_mode", self.resize_mode, RESIZE_MODES),
            ("crop_offset", self.crop_offset, CROP_OFFSETS),
            ("interpolation", self.interpolation, INTERPOLATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"ImagePreprocess {field_name} must be one of {allowed}, got {value!r}.")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"ImagePreprocess size must be (height, width) >= 1, got {self.size}.")

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (B, 3, H, W) float in [0, 1] -> (B, 3, h, w) normalised, float32, differentiable."""
        pixels = pixels.float()
        height, width = pixels.shape[-2:]
        if self.resize_mode == "shortest":
            resized = resize(pixels, shortest_side_size(height, width, self.size), self.interpolation)
        else:
            resized = resize(pixels, longest_side_size(height, width, self.size), self.interpolation)
        framed = center_crop_or_pad(resized, self.size, self.crop_offset, self.fill)  # (B, 3, h, w)
        mean = torch.tensor(self.mean, dtype=framed.dtype, device=framed.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=framed.dtype, device=framed.device).view(1, 3, 1, 1)
        return (framed - mean) / std


def _pair(size) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def open_clip_preprocess(image_size, mean=None, std=None) -> ImagePreprocess:
    """``open_clip.image_transform(image_size, is_train=False)``: shortest side, centre crop (torchvision
    rounding). image_size: int or (h, w) (``model.visual.image_size``); mean/std default to OpenAI's."""
    return ImagePreprocess(
        size=_pair(image_size),
        mean=tuple(mean or OPENAI_CLIP_MEAN),
        std=tuple(std or OPENAI_CLIP_STD),
        resize_mode="shortest",
        crop_offset="round",
    )


def hpsv2_preprocess(image_size, mean=None, std=None) -> ImagePreprocess:
    """HPSv2's ``preprocess_val``: longest side to ``image_size``, centred black padding to a square."""
    return ImagePreprocess(
        size=_pair(image_size),
        mean=tuple(mean or OPENAI_CLIP_MEAN),
        std=tuple(std or OPENAI_CLIP_STD),
        resize_mode="longest",
        fill=0.0,
    )


def _size_entry(value, key: str) -> int:
    """An int from a preprocessor_config size entry: an int, or a dict with ``key`` (or height == width)."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if key in value:
            return int(value[key])
        if "height" in value and value.get("height") == value.get("width"):
            return int(value["height"])
    raise ValueError(f"Unsupported size entry {value!r} in preprocessor_config.json (expected an int or {{'{key}': n}}).")


def clip_image_processor_preprocess(config: dict) -> ImagePreprocess:
    """transformers ``CLIPImageProcessor`` from its ``preprocessor_config.json`` dict: shortest edge to
    ``size``, centre crop to ``crop_size`` (floor offset), ``image_mean``/``image_std``, ``resample`` (3 = bicubic).

    The processor must resize and crop (``do_resize``, ``do_center_crop``), rescale by 1/255 and normalise, as CLIP's
    do; anything else raises ValueError naming the entry.
    """
    for flag in ("do_resize", "do_center_crop", "do_normalize", "do_rescale"):
        if config.get(flag, True) is False:
            raise ValueError(f"preprocessor_config.json sets {flag}=false; only CLIP's resize + crop + normalise is "
                             f"supported. Use the CLIP processor files the model was trained with.")
    rescale = float(config.get("rescale_factor", 1 / 255))
    if abs(rescale - 1 / 255) > 1e-9:
        raise ValueError(f"preprocessor_config.json has rescale_factor {rescale}; CLIP processors use 1/255.")
    resample = config.get("resample", 3)
    if resample not in PIL_RESAMPLE_NAMES:
        raise ValueError(f"preprocessor_config.json has resample={resample!r}; supported: {PIL_RESAMPLE_NAMES}.")
    shortest = _size_entry(config.get("size", 224), "shortest_edge")
    crop = config.get("crop_size", shortest)
    crop_hw = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) and "height" in crop else _pair(
        _size_entry(crop, "shortest_edge"))
    if crop_hw[0] != crop_hw[1] or crop_hw[0] != shortest:
        raise ValueError(f"preprocessor_config.json resizes to {shortest} and crops to {crop_hw}; only a square crop "
                         f"of the resized shortest edge (as CLIP's) is supported.")
    return ImagePreprocess(
        size=crop_hw,
        mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(config.get("image_std", OPENAI_CLIP_STD)),
        resize_mode="shortest",
        crop_offset="floor",
        interpolation=PIL_RESAMPLE_NAMES[resample],
    )
