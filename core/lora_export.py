"""Write a trained peft LoRA as one safetensors file that ComfyUI 0.8 and diffusers both load (METHODS.md sec. 5).

Format: kohya-style keys, per adapted module ``<prefix><module path with "." -> "_">`` with
``.lora_down.weight`` (peft ``lora_A``: (r, in) or (r, in, kh, kw)), ``.lora_up.weight`` (peft ``lora_B``: (out, r) or
(out, r, 1, 1)) and ``.alpha`` (a float32 scalar). Prefixes: ``lora_unet_`` on the diffusers UNet's module path;
``lora_te_`` for SD1.5's text encoder; ``lora_te1_``/``lora_te2_`` for SDXL's two. ComfyUI 0.8 maps these names in
``comfy/lora.py`` (``model_lora_keys_unet`` through ``comfy.utils.unet_to_diffusers``, ``model_lora_keys_clip``
through ``LORA_CLIP_MAP``); diffusers' ``load_lora_weights`` converts them with
``_convert_non_diffusers_lora_to_diffusers``. Raw peft names and diffusers' ``save_lora_weights`` output are not
matched by ComfyUI 0.8, hence this format.

Scale: ComfyUI adds ``strength * alpha / rank * (up @ down)``, peft ``scaling * (B @ A)`` with
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` under rsLoRA). The file holds each module's true alpha, i.e.
``scaling * r``, so strength 1.0 reproduces peft's merged weights.

Only modules both loaders map are exported (:data:`UNET_MODULE_PATTERNS`, :data:`TEXT_ENCODER_MODULE_PATTERNS`);
anything else (SDXL's ``add_embedding``, which diffusers' converter mangles, norms, token embeddings) is refused
with the list of what is allowed, never dropped silently. :func:`unexportable_modules` lets a trainer check its
targets before training.

This module imports neither ComfyUI nor peft: it reads peft's LoRA layers by their attributes (``lora_A``,
``lora_B``, ``r``, ``lora_alpha``, ``use_rslora``, ``scaling``, ``use_dora``, ``lora_bias``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .weights import save_safetensors_atomic

FAMILIES = ("sd15", "sdxl")  # the base-model families of the pack (trainers, model loading, LoRA export)
FORMAT_VERSION = "1"
METADATA_PREFIX = "refinery."

# the kohya key prefix of each text encoder, per family (diffusers component name -> prefix)
TEXT_ENCODER_PREFIXES = {
    "sd15": {"text_encoder": "lora_te_"},
    "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
}
UNET_PREFIX = "lora_unet_"
KOHYA_BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}  # ss_base_model_version, read by kohya tools

_BLOCK = r"(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)"
UNET_MODULE_PATTERNS = (  # diffusers UNet2DConditionModel module paths that ComfyUI 0.8 and diffusers both map
    _BLOCK + r"\.attentions\.\d+\.(?:proj_in|proj_out)",
    _BLOCK + r"\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0)",
    _BLOCK + r"\.attentions\.\d+\.transformer_blocks\.\d+\.ff\.net\.(?:0\.proj|2)",
    _BLOCK + r"\.resnets\.\d+\.(?:conv1|conv2|time_emb_proj|conv_shortcut)",
    r"down_blocks\.\d+\.downsamplers\.0\.conv",
    r"up_blocks\.\d+\.upsamplers\.0\.conv",
    r"conv_in|conv_out|time_embedding\.linear_[12]",
)
# CLIP text encoder module paths (with the ``text_model.`` prefix); ComfyUI maps layers 0-31 of these six only
TEXT_ENCODER_MODULE_PATTERNS = (
    (r"text_model\.encoder\.layers\.(?:[0-9]|[12][0-9]|3[01])\."
     r"(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])"),
)
_UNET_RE = re.compile("|".join(f"(?:{pattern})" for pattern in UNET_MODULE_PATTERNS))
_TEXT_RE = re.compile("|".join(f"(?:{pattern})" for pattern in TEXT_ENCODER_MODULE_PATTERNS))
_PEFT_WRAPPER_PREFIX = "base_model.model."  # what get_peft_model puts before every module path


def _module_path(name: str, component: str) -> str:
    """A module's path as the exporter names it: peft's wrapper prefix removed; text encoders always with the
    ``text_model.`` prefix (transformers 5 ``CLIPTextModel`` has no ``text_model`` submodule,
    ``CLIPTextModelWithProjection`` has one)."""
    name = name.removeprefix(_PEFT_WRAPPER_PREFIX)
    if component != "unet" and not name.startswith("text_model."):
        name = "text_model." + name
    return name


def unexportable_modules(module_paths: Iterable[str], component: str = "unet") -> list[str]:
    """The paths among ``module_paths`` (diffusers/transformers module names, e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``) that this format cannot carry for
    ``component`` ("unet", "text_encoder" or "text_encoder_2"). Empty when all can be exported."""
    pattern = _UNET_RE if component == "unet" else _TEXT_RE
    return [path for path in module_paths if not pattern.fullmatch(_module_path(path, component))]


@dataclasses.dataclass(frozen=True)
class _LoraModule:
    path: str  # module path in the diffusers/transformers model
    down: torch.Tensor  # peft lora_A weight: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # peft lora_B weight: (out, r) or (out, r, 1, 1)
    rank: int
    alpha: float  # true alpha: the trained scaling times the rank


def _lora_modules(model: torch.nn.Module, component: str, adapter_name: str) -> list[_LoraModule]:
    """Every peft LoRA layer of ``model`` holding ``adapter_name``, with its weights and true alpha."""
    found = []
    for name, module in model.named_modules():
        path = _module_path(name, component)
        embedding_a = getattr(module, "lora_embedding_A", None)
        if isinstance(embedding_a, torch.nn.ParameterDict) and adapter_name in embedding_a:
            raise ValueError(f"{component} module '{path}' is an Embedding LoRA, which ComfyUI's LoRA format cannot "
                             f"hold. Train without it (target_modules).")
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or adapter_name not in lora_a:
            continue
        if getattr(module, "use_dora", {}).get(adapter_name, False):
            raise ValueError(f"{component} module '{path}' is a DoRA adapter; this exporter writes plain LoRA only. "
                             f"Train with use_dora=False.")
        if getattr(module, "lora_bias", {}).get(adapter_name, False):
            raise ValueError(f"{component} module '{path}' has a LoRA bias (lora_bias=True), which ComfyUI's LoRA "
                             f"format cannot hold. Train with lora_bias=False.")
        rank = int(module.r[adapter_name])
        lora_alpha = float(module.lora_alpha[adapter_name])
        rslora = bool(getattr(module, "use_rslora", {}).get(adapter_name, False))
        trained_scaling = lora_alpha / math.sqrt(rank) if rslora else lora_alpha / rank
        scaling = float(module.scaling[adapter_name])
        if not math.isclose(scaling, trained_scaling, rel_tol=1e-6):
            raise ValueError(
                f"{component} module '{path}' runs at scaling {scaling:g}, not its trained lora_alpha/r = "
                f"{trained_scaling:g}: an inference scale was set (set_adapters weights / set_scale). Reset it to "
                f"1.0 before exporting; users pick the strength in ComfyUI."
            )
        down = module.lora_A[adapter_name].weight
        up = module.lora_B[adapter_name].weight
        if down.shape[0] != rank or up.shape[1] != rank:
            raise ValueError(f"{component} module '{path}': lora_A {tuple(down.shape)} and lora_B "
                             f"{tuple(up.shape)} do not have rank {rank}.")
        found.append(_LoraModule(path, down, up, rank, trained_scaling * rank))
    return found


def _metadata_string(value) -> str:
    if isinstance(value, str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.dumps(value, sort_keys=True, default=str)


def _uniform_or_table(values: Mapping[str, float | int]) -> str:
    """"4" when every module has the same value, else a JSON table key -> value."""
    distinct = set(values.values())
    if len(distinct) == 1:
        value = distinct.pop()
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return json.dumps(dict(sorted(values.items())))


def export_comfyui_lora(
    path: str | os.PathLike,
    *,
    base_family: str,
    method: str,
    unet: torch.nn.Module | None = None,
    text_encoders: Mapping[str, torch.nn.Module] | None = None,
    training_args: Mapping | object | None = None,
    metadata: Mapping[str, object] | None = None,
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the peft LoRA ``adapter_name`` of ``unet`` and/or ``text_encoders`` to ``path`` (safetensors, atomic).

    base_family: "sd15" or "sdxl"; picks the text-encoder prefixes and goes into the metadata.
    method: the training method ("rankdpo", "focus-n-fix", ...), written to the metadata.
    unet: a diffusers ``UNet2DConditionModel`` with peft LoRA layers (``add_adapter`` or ``get_peft_model``).
    text_encoders: {"text_encoder": model} (SD1.5) or {"text_encoder": ..., "text_encoder_2": ...} (SDXL), each a
        transformers CLIP text model with peft LoRA layers; omit when only the UNet was trained.
    training_args: a dataclass or mapping, written as JSON (``refinery.training_args``).
    metadata: extra string entries (non-strings are JSON-encoded); may not override the exporter's own keys.
    dtype: the dtype of the written lora_down/lora_up tensors (None: as trained); alphas are always float32.

    Metadata written: ``refinery.base_family``, ``.method``, ``.rank`` and ``.alpha`` (one number, or a JSON table
    kohya module name -> value when modules differ), ``.components``, ``.training_args``, ``.format_version``, and the
    kohya ``ss_network_module``/``ss_network_dim``/``ss_network_alpha``/``ss_base_model_version``.
    Raises ValueError for an unknown family or component, a model without the adapter, a module the format cannot
    carry, DoRA, LoRA bias or a non-default inference scale. Returns the path.
    """
    if base_family not in FAMILIES:
        raise ValueError(f"base_family must be one of {FAMILIES}, got {base_family!r}.")
    if not method or not isinstance(method, str):
        raise ValueError(f"method must name the training method (e.g. 'rankdpo'), got {method!r}.")
    components: dict[str, torch.nn.Module] = {}
    if unet is not None:
        components["unet"] = unet
    prefixes = {"unet": UNET_PREFIX, **TEXT_ENCODER_PREFIXES[base_family]}
    for name, model in (text_encoders or {}).items():
        if name not in TEXT_ENCODER_PREFIXES[base_family]:
            raise ValueError(f"text encoder '{name}' is not one of {base_family}'s "
                             f"{tuple(TEXT_ENCODER_PREFIXES[base_family])}.")
        if model is not None:
            components[name] = model
    if not components:
        raise ValueError("Nothing to export: pass unet and/or text_encoders.")

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for component, model in components.items():
        modules = _lora_modules(model, component, adapter_name)
        if not modules:
            raise ValueError(f"The {component} has no peft LoRA adapter named '{adapter_name}' (add one with "
                             f"trainers/common/lora.add_lora, or pass the adapter_name it was trained under).")
        refused = unexportable_modules([module.path for module in modules], component)
        if refused:
            allowed = UNET_MODULE_PATTERNS if component == "unet" else TEXT_ENCODER_MODULE_PATTERNS
            raise ValueError(
                f"{len(refused)} {component} LoRA module(s) cannot be written in a form ComfyUI 0.8 and diffusers "
                f"both load, e.g. {refused[:3]}. Exportable module paths match: {allowed}. Train without them "
                f"(target_modules)."
            )
        for module in modules:
            key = prefixes[component] + module.path.replace(".", "_")
            down, up = module.down.detach(), module.up.detach()
            if dtype is not None:
                down, up = down.to(dtype), up.to(dtype)
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
            ranks[key], alphas[key] = module.rank, module.alpha

    written = {
        METADATA_PREFIX + "format_version": FORMAT_VERSION,
        METADATA_PREFIX + "base_family": base_family,
        METADATA_PREFIX + "method": method,
        METADATA_PREFIX + "rank": _uniform_or_table(ranks),
        METADATA_PREFIX + "alpha": _uniform_or_table(alphas),
        METADATA_PREFIX + "components": json.dumps(list(components)),
        METADATA_PREFIX + "training_args": _metadata_string(training_args if training_args is not None else {}),
        "ss_network_module": "networks.lora",
        "ss_network_dim": _uniform_or_table(ranks),
        "ss_network_alpha": _uniform_or_table(alphas),
        "ss_base_model_version": KOHYA_BASE_VERSION[base_family],
    }
    for key, value in (metadata or {}).items():
        if key in written:
            raise ValueError(f"metadata key '{key}' is written by the exporter itself; pick another name.")
        written[str(key)] = _metadata_string(value)
    return save_safetensors_atomic(tensors, path, written)
