"""Shared fixtures. The ``comfyui`` ones run the pack inside a real ComfyUI 0.8 (see ``comfyui_harness.py``).

ComfyUI is found through ``$COMFYUI_DIR``, or as the ComfyUI whose ``custom_nodes/`` holds this pack. Without it the
``comfyui`` tests skip, except under CI (``$CI`` set), where they fail: CI must run them (``ci.py``: nothing skips
under CI).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ci import NEEDS_MARK, apply_needs_marks, skip_or_fail
from comfyui_harness import ComfyHarness, find_comfyui

PACK_ROOT = Path(__file__).resolve().parent.parent
QREFINE_FOLDER = PACK_ROOT.parent / "shared" / "reference" / "qrefine-pq-embeddings"

OTHER_VIT_CONFIG = {  # a different tiny tower; its JSON beside the checkpoint says width 96 instead of 64
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", NEEDS_MARK)


def pytest_runtest_setup(item: pytest.Item) -> None:
    apply_needs_marks(item)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (the suite shares a 2-core machine); use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` or as an argument."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    """The ComfyUI 0.8 root to test in; skips (fails under CI) when there is none."""
    found = find_comfyui(PACK_ROOT)
    if found is None:
        env = os.environ.get("COMFYUI_DIR")
        reason = (
            f"COMFYUI_DIR={env!r} is not a ComfyUI root (no main.py and comfy/ there)"
            if env
            else "ComfyUI not found: set COMFYUI_DIR to a ComfyUI 0.8 checkout (its root, with main.py and comfy/), "
            "or put this pack in its custom_nodes/ folder"
        )
        skip_or_fail(reason)
    return found


def _write_model_files(quality_clip: Path) -> None:
    """tiny-vit (valid, with its config), broken (random bytes), other-vit (config JSON does not match)."""
    import torch

    from tiny_models import TINY_VIT_CONFIG, build_tiny_vit

    build_tiny_vit(quality_clip, "tiny-vit", TINY_VIT_CONFIG, seed=0)
    build_tiny_vit(quality_clip, "other-vit", OTHER_VIT_CONFIG, seed=1)
    mismatching = json.loads(json.dumps(OTHER_VIT_CONFIG))
    mismatching["vision_cfg"]["width"] = 96
    (quality_clip / "other-vit.json").write_text(json.dumps(mismatching))
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=generator)
    (quality_clip / "broken.safetensors").write_bytes(bytes(noise.tolist()))


def _write_prompt_files(quality_prompts: Path) -> None:
    """The official Q-Refine PQ-*.pth (512 wide, for ViT-B/16) in quality_prompts/qrefine/, when shared/ has them."""
    import shutil

    if QREFINE_FOLDER.is_dir():
        shutil.copytree(QREFINE_FOLDER, quality_prompts / "qrefine", dirs_exist_ok=True)


def _write_input_images(input_dir: Path) -> None:
    """picture.png: 64x48 (W x H) RGB with a red disc and a blue square; dot.png: 1x1."""
    import numpy as np
    from PIL import Image

    height, width = 48, 64
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 1] = (x * 255 // (width - 1)).astype(np.uint8)  # a green ramp behind
    pixels[(x - 18) ** 2 + (y - 24) ** 2 < 100] = (230, 20, 20)
    pixels[14:34, 38:58] = (20, 20, 230)
    Image.fromarray(pixels, "RGB").save(input_dir / "picture.png")
    Image.fromarray(np.full((1, 1, 3), 128, np.uint8), "RGB").save(input_dir / "dot.png")


@pytest.fixture(scope="session")
def comfy_harness(comfyui_dir, tmp_path_factory) -> ComfyHarness:
    """One in-process ComfyUI (CPU) for the session, with the pack loaded and the test models and pictures in
    place: models/quality_clip/{tiny-vit,other-vit,broken}.safetensors, input/{picture,dot}.png."""
    import torch

    torch.set_num_threads(2)
    harness = ComfyHarness(comfyui_dir, tmp_path_factory.mktemp("comfyui"), PACK_ROOT)
    _write_model_files(harness.models_dir / "quality_clip")
    _write_prompt_files(harness.models_dir / "quality_prompts")
    _write_input_images(harness.input_dir)
    harness.start()
    return harness


@pytest.fixture(scope="session")
def run_graph(comfy_harness):
    """``run_graph(graph, outputs=None) -> GraphResult``: validate and execute an API-format graph."""
    return comfy_harness.run_graph


@pytest.fixture(scope="session")
def sd15_models(comfy_harness) -> dict[str, str]:
    """A random SD1.5-shaped UNet, CLIP-L and VAE (``sd15_checkpoint.py``; built once per machine into a cache,
    about 30 s) linked into the harness's models/{unet,text_encoders,vae}/ and registered with ComfyUI.
    Returns {"unet": name, "text_encoders": name, "vae": name} for UNETLoader, CLIPLoader, VAELoader."""
    import folder_paths

    from sd15_checkpoint import install_sd15

    names = install_sd15(comfy_harness.models_dir)
    for folder_key, sub in (("diffusion_models", "unet"), ("text_encoders", "text_encoders"), ("vae", "vae")):
        folder_paths.add_model_folder_path(folder_key, str(comfy_harness.models_dir / sub), is_default=True)
    return names


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy_harness, sd15_models) -> Path:
    """The random SD1.5 as one single-file checkpoint (what CheckpointLoaderSimple loads), written by ComfyUI's
    own CheckpointSave and cached beside the three files (``sd15_checkpoint.build_sd15_checkpoint``)."""
    from sd15_checkpoint import build_sd15_checkpoint

    return build_sd15_checkpoint(comfy_harness, sd15_models)


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir, sd15_checkpoint, comfy_harness, tmp_path_factory):
    """A real ComfyUI server (``main.py --cpu`` on 127.0.0.1, a free port) with the pack in its custom_nodes and
    models/checkpoints/sd15-random.safetensors, models/quality_clip/tiny-vit.*, input/picture.png; stopped at the
    end of the session. Its log is in ``<base>/server.log`` (shown when it fails to start)."""
    from comfyui_server import ComfyServer, link_file

    server = ComfyServer(comfyui_dir, tmp_path_factory.mktemp("comfyui-server"), PACK_ROOT)
    link_file(sd15_checkpoint, server.models_dir / "checkpoints")
    for path in sorted((comfy_harness.models_dir / "quality_clip").glob("tiny-vit.*")):
        link_file(path, server.models_dir / "quality_clip")
        link_file(path, server.models_dir / "reward_models")  # the CLIPScore reward of select_best
    _write_input_images(server.input_dir)
    server.start()
    yield server
    server.stop()
