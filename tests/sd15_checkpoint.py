"""A randomly initialised SD1.5-shaped model for the ComfyUI integration tests: UNet, CLIP-L text encoder, VAE.

ComfyUI only loads real architectures, so the files have SD1.5's exact shapes (860M-parameter UNet with 320 model
channels and context 768, the 123M CLIP-L text tower, the 84M SD VAE), with random weights from fixed seeds, saved
as fp16 safetensors in diffusers/transformers key layout:

- ``unet/sd15-random-unet.safetensors``: loaded by ``UNETLoader`` (diffusers keys, ComfyUI converts them);
- ``text_encoders/sd15-random-clip-l.safetensors``: ``CLIPLoader`` with type ``stable_diffusion`` (keys carry the
  ``text_model.`` prefix, which transformers 5 no longer writes and without which ComfyUI silently loads nothing);
- ``vae/sd15-random-vae.safetensors``: ``VAELoader`` (diffusers keys).

The files are built once per machine into a cache folder (``$REFINERY_TEST_CACHE`` or
``~/.cache/comfyui-refinery-tests``)/``sd15-random-v1/``, atomically (a temporary folder renamed into place), and
later sessions and CI reuse them; :func:`install_sd15` links them into a ComfyUI ``models/`` folder. Building took
28 s on one CPU core (random init of 1.07G parameters, 2.1 GB of fp16 files, 5.9 GB peak memory); bump ``VERSION`` when
the recipe changes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

VERSION = "sd15-random-v1"
UNET_FILE = "sd15-random-unet.safetensors"
CLIP_FILE = "sd15-random-clip-l.safetensors"
VAE_FILE = "sd15-random-vae.safetensors"
FILES = {"unet": UNET_FILE, "text_encoders": CLIP_FILE, "vae": VAE_FILE}  # ComfyUI model folder -> file name

UNET_CONFIG = dict(  # diffusers' UNet2DConditionModel defaults are SD1.5's; stated here so a default change shows
    sample_size=64,
    in_channels=4,
    out_channels=4,
    cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=8,
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
CLIP_CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)


def cache_root() -> Path:
    """Where built test models live: ``$REFINERY_TEST_CACHE``, else ``~/.cache/comfyui-refinery-tests``."""
    env = os.environ.get("REFINERY_TEST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "comfyui-refinery-tests"


def _fp16_state(module) -> dict:
    """A module's parameters and buffers as contiguous fp16 CPU tensors (integer buffers such as position ids are
    dropped: ComfyUI makes its own)."""
    return {key: value.detach().to("cpu").half().contiguous() for key, value in module.state_dict().items()
            if value.is_floating_point()}


def _write_files(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    for sub in FILES:
        (folder / sub).mkdir(parents=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    save_file(_fp16_state(unet), str(folder / "unet" / UNET_FILE))
    del unet
    torch.manual_seed(1)
    text = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))
    state = _fp16_state(text)
    state = {key if key.startswith("text_model.") else "text_model." + key: value for key, value in state.items()}
    save_file(state, str(folder / "text_encoders" / CLIP_FILE))
    del text
    torch.manual_seed(2)
    vae = AutoencoderKL(**VAE_CONFIG)
    save_file(_fp16_state(vae), str(folder / "vae" / VAE_FILE))


def build_sd15(root: Path | None = None) -> Path:
    """The cache folder holding the three files, built now when missing (atomic: temp folder, then rename)."""
    import torch

    final = (root or cache_root()) / VERSION
    if all((final / sub / name).is_file() for sub, name in FILES.items()):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    temp = Path(tempfile.mkdtemp(prefix=VERSION + ".tmp-", dir=final.parent))
    try:
        with torch.no_grad():
            _write_files(temp)
        os.chmod(temp, 0o755)  # mkdtemp makes it private; the cache is shared by later sessions and CI
        try:
            os.rename(temp, final)
        except OSError:  # another process finished first: use its copy
            if not final.is_dir():
                raise
    finally:
        torch.set_num_threads(threads)
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    logger.warning("built the random SD1.5 test model in %s in %.0f s", final, time.monotonic() - started)
    return final


CHECKPOINT_FILE = "sd15-random.safetensors"  # the single-file checkpoint, for CheckpointLoaderSimple


def build_sd15_checkpoint(harness, names: dict[str, str], root: Path | None = None) -> Path:
    """The three files as ONE single-file SD1.5 checkpoint (the layout of ``models/checkpoints/``, what users load
    with CheckpointLoaderSimple), built once into the cache as ``<VERSION>/checkpoints/sd15-random.safetensors``.

    ComfyUI writes it: its own ``CheckpointSave`` node, run in the in-process ``harness`` on UNETLoader, CLIPLoader
    and VAELoader outputs (``names`` from :func:`install_sd15`), so the keys are exactly the ones its loader
    expects. The fp32 file it saves is stored as fp16 (2.1 GB instead of 4.3 GB), atomically."""
    from safetensors.torch import load_file, save_file

    final = (root or cache_root()) / VERSION / "checkpoints" / CHECKPOINT_FILE
    if final.is_file():
        return final
    started = time.monotonic()
    prefix = f"refinery_test_checkpoint_{os.getpid()}"
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": names["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": names["text_encoders"], "type": "stable_diffusion"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": names["vae"]}},
        "4": {"class_type": "CheckpointSave", "inputs": {"model": ["1", 0], "clip": ["2", 0], "vae": ["3", 0],
                                                        "filename_prefix": f"checkpoints/{prefix}"}},
    }
    result = harness.run_graph(graph)
    if not result.success:
        raise RuntimeError(f"CheckpointSave failed: {result.error_text()}")
    saved = sorted((harness.output_dir / "checkpoints").glob(f"{prefix}*.safetensors"))
    if len(saved) != 1:
        raise RuntimeError(f"expected one saved checkpoint, found {saved}")
    state = load_file(str(saved[0]))
    state = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(final.name + f".{os.getpid()}.tmp")
    save_file(state, str(temporary))
    del state
    os.replace(temporary, final)
    saved[0].unlink()
    logger.warning("built the single-file SD1.5 test checkpoint %s in %.0f s", final, time.monotonic() - started)
    return final


def install_sd15(models_dir: Path, root: Path | None = None) -> dict[str, str]:
    """Build (once) and link the files into ``models_dir/{unet,text_encoders,vae}/``. Returns folder -> file name,
    the names the loader nodes take."""
    source = build_sd15(root)
    for sub, name in FILES.items():
        target = Path(models_dir) / sub / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                target.symlink_to(source / sub / name)
            except OSError:
                shutil.copyfile(source / sub / name, target)
    return dict(FILES)


if __name__ == "__main__":  # python tests/sd15_checkpoint.py: build the cache ahead of a test run
    logging.basicConfig(level=logging.INFO)
    t0 = time.monotonic()
    print(build_sd15(), f"{time.monotonic() - t0:.0f} s")
