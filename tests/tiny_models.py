"""What several test files share (a test file never imports another): tiny, randomly initialised models that tests
build in seconds (no downloads), the toy world's committed models, LoRA files and deltas, a Syn-Pic dataset of
random pictures, torch threads for module-scoped fixtures, and the pack's console commands as subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch

PACK_ROOT = Path(__file__).resolve().parent.parent
TOY_MODELS = PACK_ROOT / "benchmarks" / "toyworld" / "models"
TINY_SD = TOY_MODELS / "tiny-sd"  # the committed tiny SD1.5-shaped diffusers pipeline
TOY_CLIP = TOY_MODELS / "toy-clip.safetensors"  # the committed toy open_clip (a CLIPScore reward, a quality model)


@contextlib.contextmanager
def torch_threads(count: int = 1):
    """Torch on ``count`` threads inside the block, restored after it (module-scoped fixtures; a test uses
    conftest's ``one_thread`` fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

TINY_VIT_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_tiny_vit(folder: Path, name: str = "tiny-vit", config: dict | None = None, seed: int = 0) -> Path:
    """Write ``<name>.json`` (open_clip config) and ``<name>.safetensors`` into ``folder``; returns the checkpoint."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config or TINY_VIT_CONFIG))
    open_clip.add_model_config(str(config_path))
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():  # a trained-like temperature so probabilities are not squeezed to 0.5
        model.logit_scale.fill_(torch.tensor(100.0).log())
    checkpoint = folder / f"{name}.safetensors"
    save_file(model.state_dict(), str(checkpoint))
    return checkpoint


TINY_TRANSFORMERS_CLIP = {
    "projection_dim": 24,
    "text_config": {"hidden_size": 48, "intermediate_size": 120, "num_hidden_layers": 2, "num_attention_heads": 3},
    "vision_config": {"hidden_size": 32, "intermediate_size": 80, "num_hidden_layers": 3, "num_attention_heads": 4,
                      "image_size": 32, "patch_size": 8},
}
"""A tiny transformers CLIPModel: head widths 16 (text) and 8 (image), MLP ratio 2.5, so a wrong head count or
MLP width shows; the vocabulary and context are CLIP's (49408 BPE tokens, 77)."""


def build_tiny_transformers_clip(folder: Path, hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5,
                                 seed: int = 0):
    """A randomly initialised transformers ``CLIPModel`` saved with ``save_pretrained`` into ``folder``
    (config.json + model.safetensors); returns the model (eval mode). Every parameter, layer norms and biases
    included, gets random noise (transformers initialises norms to 1 and biases to 0, where a swapped norm or bias
    would not show), and ``logit_scale`` is log 50 (not the init value)."""
    from transformers import CLIPConfig, CLIPModel

    towers = {name: {**TINY_TRANSFORMERS_CLIP[name], "hidden_act": hidden_act, "layer_norm_eps": layer_norm_eps}
              for name in ("text_config", "vision_config")}
    config = CLIPConfig(projection_dim=TINY_TRANSFORMERS_CLIP["projection_dim"], **towers)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        model.logit_scale.fill_(torch.tensor(50.0).log())
    model.save_pretrained(str(folder))
    return model


def write_qrefine_prompts(folder: Path, width: int = 64, seed: int = 0) -> Path:
    """Random prompt files in the official Q-Refine layout (``PQ-<factor>.pth``: ``{"params": {prompt_learner.ctx
    (2, 16, W), token_prefix (2, 1, W), token_suffix (2, 60, W)}}``) for a text tower of width W (64 = the tiny
    ViT's; the official files are 512 wide, for ViT-B/16); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for factor in ("overall", "technical", "rational", "natural"):
        params = {
            "prompt_learner.ctx": torch.randn(2, 16, width, generator=generator),
            "prompt_learner.token_prefix": torch.randn(2, 1, width, generator=generator),
            "prompt_learner.token_suffix": torch.randn(2, 60, width, generator=generator),
        }
        torch.save({"params": params}, folder / f"PQ-{factor}.pth")
    return folder


# ------------------------------------------------------------------------------------------------ UNets, text encoders
# tiny UNets with the block structure (hence the module paths) of SD1.5-style and SDXL UNets
TINY_SD15_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
TINY_SDXL_UNET = dict(  # SDXL base: 3 levels, 2 resnets each, transformer depth 1/2/10 (mid 10), text_time embedding
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(1, 2, 4), cross_attention_dim=32,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8,
)


def tiny_unet(config: dict = TINY_SD15_UNET, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def tiny_text_encoder(layers: int = 2, width: int = 32, projection: bool = False, seed: int = 1):
    """A tiny CLIP text tower; ``projection=True`` gives SDXL's second encoder class."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                            bos_token_id=998, eos_token_id=999, pad_token_id=999)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


# ------------------------------------------------------------------------------------------------ LoRA
def randomize_lora(*models, std: float = 0.05, seed: int = 2) -> None:
    """Random, non-zero A and B in every LoRA layer (peft starts B at 0, where every equality passes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)


def lora_deltas(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """module path (without ``text_model.``) -> peft's delta weight ``scaling * B @ A`` of that adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "lora_A", {}):
            deltas[name.removeprefix("text_model.")] = module.get_delta_weight(adapter_name).detach()
    return deltas


def read_lora(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA ``.safetensors`` file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


# ------------------------------------------------------------------------------------------------ datasets
def write_synpic_dataset(folder: Path, prompts: int = 4, k: int = 3, size: int = 64, seed: int = 0) -> Path:
    """A Syn-Pic-format folder (``index.jsonl`` + ``images/``): random pictures, k per prompt, win rates evenly
    spaced from 1 (first picture) to 0 (last). Returns the folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for prompt in range(prompts):
        images = []
        for index in range(k):
            name = f"images/p{prompt}_g{index}.png"
            Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / name)
            images.append(name)
        win_rates = [1.0 - index / (k - 1) for index in range(k)]
        lines.append(json.dumps({"prompt": f"a red circle number {prompt}", "images": images,
                                 "win_rates": win_rates, "scores": {"toy": win_rates}}))
    (folder / "index.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# ------------------------------------------------------------------------------------------------ console commands
# one thread per run (2-core CI machines); warnings are shown as a user would see them
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def console_scripts() -> dict[str, str]:
    """The ``[project.scripts]`` of pyproject.toml: command name -> ``module:function``."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def console_command(name: str) -> list[str]:
    """The installed console script ``name`` beside this Python, else what it runs: ``sys.exit(main())``."""
    installed = Path(sys.executable).parent / name
    if installed.is_file():
        return [str(installed)]
    module_name, function_name = console_scripts()[name].split(":")
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from {module_name} import {function_name}; "
            f"sys.exit({function_name}())"]
