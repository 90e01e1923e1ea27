"""open_clip files and configs, read offline: the one loader of open_clip CLIPs (quality CLIP, CLIPScore, HPSv2,
aesthetic towers, trained rewards) and everything it reads.

Checkpoints: open_clip state dicts (``.safetensors`` preferred; ``.pt/.pth/.bin`` read with
``torch.load(weights_only=True)``, a ``{"state_dict": ...}`` wrapper and DDP ``module.`` prefixes accepted), and
transformers ``CLIPModel`` weights (a folder with ``config.json`` and ``model.safetensors`` or a sharded index, or one
weights file of that layout), converted on load to the same open_clip model (see "transformers CLIPModel layout").

Architectures: an open_clip model name (``open_clip.list_models()``), :data:`AUTO_ARCHITECTURE` (an open_clip model
config ``<checkpoint stem>.json`` beside the checkpoint; for transformers weights also their ``config.json``, or the
shapes of one of OpenAI's releases), or an open_clip model config dict. Nothing is ever downloaded.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .weights import load_state_dict, state_dict_mismatch

logger = logging.getLogger(__name__)

AUTO_ARCHITECTURE = "auto"
"""Architecture name meaning: read an open_clip model config ``<checkpoint stem>.json`` beside the checkpoint."""

Architecture = str | Mapping
"""An open_clip model name, :data:`AUTO_ARCHITECTURE`, or an open_clip model config dict."""

CUSTOM_CONFIG_LABEL = "custom config"
"""How messages name a model built from a config dict that is not one of open_clip's names."""


# -- open_clip model configs -------------------------------------------------------------------------------------
def check_open_clip_config(config: Mapping, where: str) -> None:
    """ValueError unless ``config`` is an open_clip model config of a contrastive CLIP (``embed_dim``, ``vision_cfg``
    and ``text_cfg``; no CoCa ``multimodal_cfg``); ``where`` names it in the message."""
    if not all(isinstance(config.get(key), Mapping) for key in ("vision_cfg", "text_cfg")) or "embed_dim" not in config:
        raise ValueError(f"{where} is not an open_clip model config: it needs 'embed_dim', 'vision_cfg' and 'text_cfg'.")
    if "multimodal_cfg" in config:
        raise ValueError(f"{where} describes a CoCa captioning model; a contrastive CLIP is needed.")


def register_config_beside(checkpoint: str | os.PathLike) -> str:
    """Register ``<stem>.json`` (an open_clip model config) beside ``checkpoint`` with open_clip; returns its name
    (the stem). FileNotFoundError when there is none; ValueError when it is no model config, or when it would
    redefine one of open_clip's own architectures with another model."""
    import open_clip

    checkpoint = Path(checkpoint)
    config_path = checkpoint.with_suffix(".json")
    if not config_path.is_file():
        raise FileNotFoundError(
            f"Architecture 'auto' needs an open_clip model config '{config_path.name}' beside the checkpoint "
            f"'{checkpoint}', and there is none. Choose the checkpoint's architecture from the list "
            f"(e.g. 'ViT-B-16-quickgelu' for OpenAI ViT-B/16 weights) or put its config JSON beside it."
        )
    config = read_json(config_path)
    check_open_clip_config(config, f"'{config_path}'")
    existing = open_clip.get_model_config(config_path.stem)
    if existing is not None and existing != config:
        raise ValueError(
            f"'{config_path.name}' describes another model than open_clip's own architecture '{config_path.stem}'. "
            f"Rename the checkpoint and its JSON (e.g. 'my-{config_path.stem}'), or choose '{config_path.stem}' "
            f"as the architecture and remove the JSON."
        )
    open_clip.add_model_config(str(config_path))
    return config_path.stem


def resolve_open_clip_config(checkpoint: str | os.PathLike, architecture: Architecture) -> tuple[str, dict]:
    """``(name, config)`` of the open_clip model to build for an open_clip checkpoint: ``name`` is the open_clip model
    name ("" for a config dict), ``config`` a copy of its model config (``embed_dim``, ``vision_cfg``, ``text_cfg``,
    ...)."""
    import open_clip

    if isinstance(architecture, Mapping):
        config = copy.deepcopy(dict(architecture))
        check_open_clip_config(config, "the given architecture config")
        return "", config
    name = register_config_beside(checkpoint) if architecture == AUTO_ARCHITECTURE else str(architecture)
    config = open_clip.get_model_config(name)
    if config is None:
        raise _unknown_architecture(name)
    return name, config


def _unknown_architecture(name: str) -> ValueError:
    return ValueError(
        f"Unknown open_clip architecture '{name}'. Choose one of open_clip's names (the 'architecture' list of the "
        f"loader node; open_clip.list_models() in scripts), e.g. 'ViT-B-16' or 'ViT-L-14-quickgelu', or 'auto' with "
        f"the model config JSON '<checkpoint stem>.json' beside the checkpoint."
    )


def build_open_clip(config: Mapping) -> torch.nn.Module:
    """A randomly initialised open_clip CLIP (or CustomTextCLIP) from a model config, on the CPU in float32, without
    any download (timm / Hugging Face towers are built without their pretrained weights: the checkpoint has them).
    Same model classes and arguments as ``open_clip.create_model(name, pretrained=None)``."""
    from open_clip.model import CLIP, CustomTextCLIP

    check_open_clip_config(config, "The open_clip config")
    config = copy.deepcopy(dict(config))
    text_cfg, vision_cfg = config["text_cfg"], config["vision_cfg"]
    hf_text = "hf_model_name" in text_cfg
    if hf_text:
        text_cfg["hf_model_pretrained"] = False
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    model_class = CustomTextCLIP if (config.pop("custom_text", False) or hf_text) else CLIP
    return model_class(**config)


def open_clip_tokenizer(name: str, config: Mapping):
    """The tokenizer of open_clip model ``name`` (open_clip's own choice), or, for a config without a registered name,
    CLIP's BPE ``SimpleTokenizer`` with the config's context length. Hugging Face tokenizers (``hf_tokenizer_name``)
    would need a download and are refused for unnamed configs."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    if name and open_clip.get_model_config(name) is not None:
        return open_clip.get_tokenizer(name)
    text_cfg = config["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        raise ValueError(
            f"This open_clip config uses the Hugging Face tokenizer '{text_cfg['hf_tokenizer_name']}', which cannot be "
            f"loaded offline without an open_clip architecture name. Save the model under an open_clip architecture."
        )
    return SimpleTokenizer(context_length=int(text_cfg.get("context_length", 77)), **text_cfg.get("tokenizer_kwargs", {}))


# -- weights ------------------------------------------------------------------------------------------------------
def is_open_clip_state_dict(keys) -> bool:
    """True for the keys of an open_clip CLIP (CLIP or CustomTextCLIP), DDP ``module.`` prefixes allowed."""
    keys = {key.removeprefix("module.") for key in keys}
    has_text = "token_embedding.weight" in keys or any(key.startswith("text.") for key in keys)
    return has_text and any(key.startswith("visual.") for key in keys)


OPEN_CLIP_ADVICE = "Choose the architecture it was trained as, or 'auto' with its model config JSON beside it."


def load_open_clip_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, label: str,
                           layout: str = "open_clip", advice: str = OPEN_CLIP_ADVICE) -> None:
    """Load ``state_dict`` into ``model`` strictly (DDP ``module.`` prefixes removed), or raise ValueError saying
    whether the file is another model family altogether or a CLIP of another architecture, with example keys.
    source: the file name, label: the architecture, layout: the file's layout, for messages; advice: what to do
    about a mismatch."""
    from .rewards.base import example_keys, guess_model_family  # (core.rewards imports this module)

    if any(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    expected = model.state_dict()
    if not is_open_clip_state_dict(state_dict):
        family = guess_model_family(state_dict)
        looks_like = f"its keys look like {family}" if family else "its keys are not an open_clip CLIP's"
        raise ValueError(
            f"'{source}' is not an open_clip CLIP state dict for architecture '{label}': {looks_like} "
            f"(e.g. {example_keys(state_dict)}; expected keys such as {example_keys(expected)}). Choose a CLIP "
            f"checkpoint."
        )
    details = state_dict_mismatch(state_dict, expected)
    if details:
        raise ValueError(f"Checkpoint '{source}' ({layout} layout) does not match architecture '{label}': {details}. "
                         f"{advice}")
    model.load_state_dict(state_dict, strict=True)


@dataclass(frozen=True)
class OpenClipModel:
    """An open_clip CLIP loaded by :func:`load_open_clip_model`.

    model: the CLIP on the CPU in float32, eval mode; name: its open_clip model name ("" for a config that is none of
    open_clip's); config: its open_clip model config; label: the architecture as messages name it; layout:
    "open_clip" or "transformers CLIPModel".
    """

    model: torch.nn.Module
    name: str
    config: dict
    label: str
    layout: str

    def tokenizer(self):
        """The model's tokenizer (:func:`open_clip_tokenizer`)."""
        return open_clip_tokenizer(self.name, self.config)


def load_open_clip_model(
    checkpoint: str | os.PathLike,
    architecture: Architecture = AUTO_ARCHITECTURE,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    what: str = "open_clip checkpoint",
) -> OpenClipModel:
    """Load an open_clip CLIP offline from a local checkpoint (module docstring for the layouts and architectures).

    state_dict: the already-read weights (skips reading ``checkpoint`` again, which then only names the file and
    locates the configs beside it). what: what the file should be, for messages. A transformers CLIP takes the image
    normalisation of a ``preprocessor_config.json`` beside it (``model.visual.image_mean`` / ``image_std``).
    Raises FileNotFoundError for a missing file or config and ValueError, naming the file, for anything that does not
    load (unreadable files, unknown architectures, weights of another model).
    """
    path = Path(checkpoint)
    weights = transformers_weight_files(path) if path.exists() and state_dict is None else [path]
    if state_dict is None:
        state_dict = {}
        for weight_file in weights:
            state_dict.update(load_state_dict(weight_file, what=what))
    if any(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    if isinstance(architecture, str) and architecture != AUTO_ARCHITECTURE:
        import open_clip

        if open_clip.get_model_config(architecture) is None:
            raise _unknown_architecture(architecture)
    normalisation, advice = None, OPEN_CLIP_ADVICE
    if transformers_clip_prefix(state_dict) is not None:
        layout = "transformers CLIPModel"
        state_dict = convert_transformers_clip(state_dict, path.name)
        name, config, label = _transformers_architecture(path, weights, state_dict, architecture)
        normalisation = _image_normalisation(weights[0].parent)
        if architecture == AUTO_ARCHITECTURE:
            advice = ("The config it was read with (the config.json or <stem>.json beside the weights, or the shapes "
                      "of an OpenAI release) describes another model: put the model's own transformers config.json "
                      "beside the weights, or choose its open_clip architecture.")
    elif path.is_dir():
        raise ValueError(
            f"The folder '{path}' holds weights that are not a transformers CLIPModel's; open_clip checkpoints are "
            f"chosen as files."
        )
    else:
        layout = "open_clip"
        name, config = resolve_open_clip_config(path, architecture)
        label = name or CUSTOM_CONFIG_LABEL
    model = build_open_clip(config)
    load_open_clip_weights(model, state_dict, path.name, label, layout, advice)
    if normalisation is not None:
        model.visual.image_mean, model.visual.image_std = normalisation
    logger.info("Loaded open_clip '%s' (%s layout) from %s", label, layout, path)
    return OpenClipModel(model.eval(), name or "", config, label, layout)


# -- transformers CLIPModel layout --------------------------------------------------------------------------------
# A transformers ``CLIPModel`` holds the same computation as open_clip's CLIP with a ViT image tower: pre-LN blocks,
# a class token and learned position embeddings, ``pre_layrnorm`` (transformers' spelling) before the blocks and
# ``post_layernorm`` on the class token, projections without bias, the same causal text tower pooled at the
# end-of-text token, and ``logit_scale`` as a log. Only the parameter names and layouts differ: q, k and v are
# separate Linear layers (open_clip: one fused ``in_proj``), and the projections are Linear weights (D, width)
# where open_clip keeps (width, D) matrices. The tokenizer is the same CLIP BPE (49,408 tokens, end-of-text 49407
# the highest id), so open_clip's tokenizer gives the ids transformers' CLIPTokenizer gives.
TRANSFORMERS_CLIP_MARKER = "vision_model.embeddings.patch_embedding.weight"
"""A key only a transformers CLIP (or CLIPVision) state dict has, after any prefix such as ``clip.``."""
TRANSFORMERS_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                             "pytorch_model.bin.index.json")
"""The weight files of a transformers folder, in the order they are looked for (an index names its shards)."""
TRANSFORMERS_SIDE_FILES = ("config.json", "preprocessor_config.json", "processor_config.json")
TRANSFORMERS_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                              "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
"""transformers' ``CLIPTextConfig`` defaults: a config.json leaves out what equals them."""
TRANSFORMERS_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "num_channels": 3,
                                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
"""transformers' ``CLIPVisionConfig`` defaults."""
TRANSFORMERS_PROJECTION_DEFAULT = 512
CLIP_BPE_VOCABULARY = 49408
OPENAI_RELEASES = ("ViT-B-32-quickgelu", "ViT-B-16-quickgelu", "ViT-L-14-quickgelu", "ViT-L-14-336-quickgelu")
"""OpenAI's CLIP ViTs (openai/clip-vit-{base-patch32,base-patch16,large-patch14,large-patch14-336}): a
transformers file of exactly their shapes needs no config.json (head width 64 and QuickGELU, as OpenAI trained them)."""
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}
"""transformers ``hidden_act`` -> open_clip ``quick_gelu`` (open_clip's other choice is nn.GELU, exact = "gelu")."""
_LAYER_KEY = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_TOWER_BLOCKS = {"text_model": "transformer.resblocks", "vision_model": "visual.transformer.resblocks"}
_RENAMES = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.pre_layernorm.weight": "visual.ln_pre.weight",  # the spelling some ports use
    "vision_model.pre_layernorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
"""Linear (D, width) weights -> open_clip (width, D) projection matrices."""


def transformers_clip_prefix(keys) -> str | None:
    """The prefix before ``vision_model.`` in a transformers CLIP state dict ("" for ``save_pretrained``'s own
    keys, e.g. "clip." or "model." for wrapped ones), or None when ``keys`` are not a transformers CLIP's."""
    for key in keys:
        if key.endswith(TRANSFORMERS_CLIP_MARKER):
            return key[: -len(TRANSFORMERS_CLIP_MARKER)]
    return None


def convert_transformers_clip(state_dict: dict[str, torch.Tensor],
                              source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel`` state dict -> the open_clip ``CLIP`` state dict of the same model.

    Keys may carry a common prefix (``transformers_clip_prefix``); ``*.position_ids`` buffers (older transformers
    saved them) are dropped; q, k, v (width, width) each are stacked into ``in_proj_weight`` (3 width, width) in
    that order; Linear projections (D, width) are transposed to (width, D). Keys that are not part of a CLIPModel
    are kept under their own names, so loading reports them as unexpected. Raises ValueError for an image-only
    (``CLIPVisionModel``) state dict: scoring needs the text tower for its prompts.
    """
    prefix = transformers_clip_prefix(state_dict)
    if prefix is None:
        raise ValueError(f"'{source}' is not a transformers CLIP state dict: it has no '{TRANSFORMERS_CLIP_MARKER}'.")
    weights = {key[len(prefix):]: value for key, value in state_dict.items()
               if key.startswith(prefix) and not key.endswith("position_ids")}
    if "text_model.embeddings.token_embedding.weight" not in weights:
        raise ValueError(
            f"'{source}' holds only a CLIP image tower (a transformers CLIPVisionModel): scoring needs the text tower "
            f"too, for the prompts (quality prompts, AQ-Map phrases, reward prompts). Use the whole CLIPModel's "
            f"weights."
        )
    converted: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # open_clip in_proj key -> {"q"|"k"|"v": tensor}
    for key, value in weights.items():
        layer = _LAYER_KEY.match(key)
        if key in _RENAMES:
            converted[_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            converted[_TRANSPOSED[key]] = value.T.contiguous()  # (D, width) -> (width, D)
        elif layer is not None:
            tower, index, rest = layer.groups()
            block = f"{_TOWER_BLOCKS[tower]}.{index}"
            projection = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            part, _, parameter = rest.rpartition(".")
            if projection is not None:
                fused.setdefault(f"{block}.attn.in_proj_{projection.group(2)}", {})[projection.group(1)] = value
            elif part in _LAYER_PARTS:
                converted[f"{block}.{_LAYER_PARTS[part]}.{parameter}"] = value
            else:
                converted[key] = value
        else:
            converted[key] = value
    for key, parts in fused.items():
        if set(parts) == {"q", "k", "v"}:
            converted[key] = torch.cat([parts["q"], parts["k"], parts["v"]])  # 3 x (width, ...) -> (3 width, ...)
        else:  # incomplete: keep the parts under their names so loading names what is missing
            converted.update({f"{key}.{name}_proj": value for name, value in parts.items()})
    return converted


def _merged_tower_config(config: dict, tower: str, defaults: dict) -> dict:
    """One tower's transformers config with its defaults; ``<tower>_config_dict`` (older configs such as
    openai/clip-vit-base-patch16's) overrides ``<tower>_config``, as transformers reads them."""
    merged = dict(defaults)
    for key in (f"{tower}_config", f"{tower}_config_dict"):
        if isinstance(config.get(key), dict):
            merged.update({name: value for name, value in config[key].items() if value is not None})
    return merged


def open_clip_config_from_transformers(config: dict, source: str = "config.json") -> dict:
    """A transformers ``CLIPConfig`` (the dict of its config.json) -> the open_clip model config of the same model
    (``embed_dim``, ``quick_gelu``, ``vision_cfg``, ``text_cfg``). Raises ValueError, naming ``source``, for configs
    open_clip's CLIP cannot express (other activations, channels, or vocabularies than CLIP's BPE)."""
    if config.get("model_type") not in (None, "clip") or not isinstance(config.get("vision_config"), dict):
        raise ValueError(
            f"'{source}' is not a transformers CLIPModel config (model_type {config.get('model_type')!r}, expected "
            f"'clip' with a 'vision_config' and a 'text_config')."
        )
    text = _merged_tower_config(config, "text", TRANSFORMERS_TEXT_DEFAULTS)
    vision = _merged_tower_config(config, "vision", TRANSFORMERS_VISION_DEFAULTS)
    activations = {text["hidden_act"], vision["hidden_act"]}
    if len(activations) != 1 or not activations <= set(_ACTIVATIONS):
        raise ValueError(
            f"'{source}' uses the activation(s) {sorted(activations)}; open_clip's CLIP runs one of "
            f"{list(_ACTIVATIONS)} in both towers."
        )
    if int(vision["num_channels"]) != 3:
        raise ValueError(f"'{source}' has an image tower for {vision['num_channels']} channels; pictures have 3.")
    if int(text["vocab_size"]) != CLIP_BPE_VOCABULARY:
        raise ValueError(
            f"'{source}' has a text vocabulary of {text['vocab_size']} tokens, not CLIP's {CLIP_BPE_VOCABULARY} BPE "
            f"tokens: its tokenizer is not CLIP's, which this loader uses."
        )

    def tower_shape(tower: dict, name: str) -> tuple[int, int, float]:
        width, heads = int(tower["hidden_size"]), int(tower["num_attention_heads"])
        hidden = int(tower["intermediate_size"])
        if width % heads or int(width * (hidden / width)) != hidden:
            raise ValueError(f"'{source}': the {name} tower's width {width}, {heads} heads and MLP width {hidden} "
                             f"do not fit open_clip's transformer.")
        return width, heads, hidden / width

    vision_width, vision_heads, vision_ratio = tower_shape(vision, "image")
    text_width, text_heads, text_ratio = tower_shape(text, "text")
    vision_cfg = {"image_size": int(vision["image_size"]), "layers": int(vision["num_hidden_layers"]),
                  "width": vision_width, "patch_size": int(vision["patch_size"]),
                  "head_width": vision_width // vision_heads, "mlp_ratio": vision_ratio}
    text_cfg = {"context_length": int(text["max_position_embeddings"]), "vocab_size": int(text["vocab_size"]),
                "width": text_width, "heads": text_heads, "layers": int(text["num_hidden_layers"]),
                "mlp_ratio": text_ratio}
    for tower_cfg, tower in ((vision_cfg, vision), (text_cfg, text)):
        if not math.isclose(float(tower["layer_norm_eps"]), 1e-5, rel_tol=1e-6):
            tower_cfg["norm_kwargs"] = {"eps": float(tower["layer_norm_eps"])}
    return {"embed_dim": int(config.get("projection_dim") or TRANSFORMERS_PROJECTION_DEFAULT),
            "quick_gelu": _ACTIVATIONS[vision["hidden_act"]], "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def _normalised_config(config: dict) -> dict | None:
    """An open_clip model config with every tower field filled in from open_clip's defaults, for comparing configs;
    None for configs with more than a plain CLIP (custom text, timm towers, logit bias ...)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    if set(config) - {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}:
        return None
    try:
        vision = vars(CLIPVisionCfg(**config["vision_cfg"]))
        text = vars(CLIPTextCfg(**config["text_cfg"]))
    except TypeError:
        return None
    return {"embed_dim": config["embed_dim"], "quick_gelu": bool(config.get("quick_gelu", False)),
            "vision_cfg": vision, "text_cfg": text}


def open_clip_name_of(config: dict) -> str | None:
    """The open_clip architecture name whose config builds the same model as ``config`` (the shortest such name,
    e.g. 'ViT-B-16-quickgelu' for openai/clip-vit-base-patch16's converted config), or None."""
    import open_clip

    wanted = _normalised_config(config)
    if wanted is None:
        return None
    names = sorted(open_clip.list_models(), key=lambda name: (len(name), name))
    return next((name for name in names if _normalised_config(open_clip.get_model_config(name) or {}) == wanted), None)


def _shape_signature(state_dict: dict[str, torch.Tensor]) -> tuple | None:
    """The sizes an open_clip CLIP state dict pins down: (image width, image layers, patch, image size, image MLP
    width, text width, text layers, context, vocabulary, text MLP width, embedding width); None when incomplete.
    (Head counts and the activation leave no trace in the shapes.)"""

    def layers(prefix: str) -> int:
        return len({key.split(".")[len(prefix.split("."))] for key in state_dict if key.startswith(prefix + ".")})

    try:
        width, _, patch, _ = state_dict["visual.conv1.weight"].shape
        grid = math.isqrt(state_dict["visual.positional_embedding"].shape[0] - 1)
        return (int(width), layers("visual.transformer.resblocks"), int(patch), int(grid * patch),
                int(state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                int(state_dict["token_embedding.weight"].shape[1]), layers("transformer.resblocks"),
                int(state_dict["positional_embedding"].shape[0]), int(state_dict["token_embedding.weight"].shape[0]),
                int(state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                int(state_dict["visual.proj"].shape[1]))
    except (KeyError, ValueError, IndexError):
        return None


def _config_signature(config: dict) -> tuple:
    """:func:`_shape_signature` of the model an open_clip config builds."""
    normalised = _normalised_config(config)
    vision, text = normalised["vision_cfg"], normalised["text_cfg"]
    return (vision["width"], vision["layers"], vision["patch_size"], vision["image_size"],
            int(vision["width"] * vision["mlp_ratio"]), text["width"], text["layers"], text["context_length"],
            text["vocab_size"], int(text["width"] * text["mlp_ratio"]), normalised["embed_dim"])


def openai_release_of(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The open_clip name of the OpenAI CLIP release (:data:`OPENAI_RELEASES`) with exactly the shapes of this
    (converted, open_clip-keyed) state dict, or None."""
    import open_clip

    signature = _shape_signature(state_dict)
    return next((name for name in OPENAI_RELEASES
                 if signature is not None and _config_signature(open_clip.get_model_config(name)) == signature), None)


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``; ValueError naming the file when it is unreadable or not an object."""
    path = Path(path)
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"'{path}' is not a readable JSON file: {error}") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"'{path}' holds a JSON {type(loaded).__name__}, not a model config.")
    return loaded


def transformers_weight_files(checkpoint: Path) -> list[Path]:
    """The weight files to read for ``checkpoint``: a transformers folder's (:data:`TRANSFORMERS_WEIGHT_FILES`; an
    index lists its shards), every shard when ``checkpoint`` is one shard of an index beside it, else itself."""
    def shards(index: Path) -> list[Path]:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"'{index}' is not a transformers weight index: it has no 'weight_map'.")
        return [index.parent / name for name in sorted(set(weight_map.values()))]

    if checkpoint.is_dir():
        for name in TRANSFORMERS_WEIGHT_FILES:
            if (checkpoint / name).is_file():
                return shards(checkpoint / name) if name.endswith(".index.json") else [checkpoint / name]
        raise FileNotFoundError(
            f"The folder '{checkpoint}' holds no CLIP weights: a transformers CLIPModel folder has config.json and "
            f"one of {list(TRANSFORMERS_WEIGHT_FILES)}."
        )
    for name in TRANSFORMERS_WEIGHT_FILES[1::2]:  # the index files
        index = checkpoint.parent / name
        if index.is_file() and checkpoint in (files := shards(index)):
            return files
    return [checkpoint]


def checkpoint_files(checkpoint: str | os.PathLike) -> list[Path]:
    """Every file :func:`load_open_clip_model` may read for ``checkpoint`` that exists: its weights (all shards), the
    open_clip config ``<stem>.json`` and the transformers config.json / preprocessor files beside them. A loader
    node fingerprints these, so replacing any of them reloads the model."""
    checkpoint = Path(checkpoint)
    try:
        weights = transformers_weight_files(checkpoint) if checkpoint.exists() else [checkpoint]
    except (OSError, ValueError):
        weights = [checkpoint]
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    side = [] if checkpoint.is_dir() else [checkpoint.with_suffix(".json")]
    side += [folder / name for name in TRANSFORMERS_SIDE_FILES + TRANSFORMERS_WEIGHT_FILES[1::2]]
    return [path for path in dict.fromkeys(weights + side) if path.is_file()]


def _image_normalisation(folder: Path) -> tuple[list[float], list[float]] | None:
    """(mean, std) from a transformers ``preprocessor_config.json`` (transformers 4) or ``processor_config.json``
    (transformers 5, under ``image_processor``) in ``folder``, or None (CLIP's OpenAI normalisation then)."""
    for name, entry in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = folder / name
        if path.is_file():
            config = read_json(path)
            config = config.get(entry, {}) if entry else config
            if isinstance(config, dict) and config.get("image_mean") and config.get("image_std"):
                return list(config["image_mean"]), list(config["image_std"])
    return None


def _transformers_architecture(checkpoint: Path, weights: list[Path], state_dict: dict,
                               architecture: Architecture) -> tuple:
    """(open_clip name or None, open_clip config, label) of a converted transformers CLIP, from the architecture
    chosen, else (``auto``) the first of: an open_clip ``<stem>.json`` or transformers config ``<stem>.json`` beside
    a file, the transformers ``config.json`` beside the weights, the shapes of one of OpenAI's releases."""
    import open_clip

    if isinstance(architecture, Mapping):
        return (*resolve_open_clip_config(checkpoint, architecture), CUSTOM_CONFIG_LABEL)
    if architecture != AUTO_ARCHITECTURE:
        return architecture, open_clip.get_model_config(architecture), architecture
    candidates = [] if checkpoint.is_dir() else [checkpoint.with_suffix(".json")]
    candidates.append(weights[0].parent / "config.json")
    for candidate in candidates:
        if not candidate.is_file():
            continue
        config = read_json(candidate)
        if "vision_cfg" in config and candidate.name != "config.json":  # an open_clip config, as for open_clip files
            name = register_config_beside(checkpoint)
            return name, open_clip.get_model_config(name), name
        converted = open_clip_config_from_transformers(config, str(candidate))
        name = open_clip_name_of(converted)
        model_name = candidate.parent.name if candidate.name == "config.json" else checkpoint.stem
        return name, converted, name or f"transformers CLIP '{model_name}'"
    release = openai_release_of(state_dict)
    if release is None:
        raise ValueError(
            f"'{checkpoint.name}' is a transformers CLIPModel state dict without its config: its shapes are none of "
            f"OpenAI's releases {list(OPENAI_RELEASES)}, and the head counts and activation cannot be read from "
            f"shapes. Put the model's transformers config.json beside it (or as '{checkpoint.stem}.json'), or choose "
            f"its open_clip architecture."
        )
    logger.info("'%s' has the shapes of OpenAI's %s: loading it as that architecture", checkpoint.name, release)
    return release, open_clip.get_model_config(release), release
