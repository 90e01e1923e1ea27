"""PickScore (Kirstain et al. 2023, "Pick-a-Pic"), a transformers ``CLIPModel`` folder loaded offline.

Layout (what ``CLIPModel.save_pretrained`` + ``CLIPProcessor.save_pretrained`` write; the Hub repos
``yuvalkirstain/PickScore_v1`` + the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` copied beside it):

- ``config.json`` with ``model_type`` "clip";
- weights: ``model.safetensors`` (or its sharded ``model.safetensors.index.json``), else ``pytorch_model.bin`` (or its
  index), which transformers reads with ``torch.load(weights_only=True)``;
- processor: ``preprocessor_config.json`` (transformers 4) or ``processor_config.json`` with an ``image_processor``
  entry (transformers 5), and the tokenizer: ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``, with
  ``tokenizer_config.json``. PickScore's README loads the processor from the LAION ViT-H-14 repo: its files may sit in
  the model folder or in another local folder (``processor_folder``).

Score, as PickScore's README: ``model.logit_scale.exp() * cos(image_embedding, text_embedding)``, i.e. the CLIP logit
(temperature about 100; trained PickScore gives about 18-23 for good matches). Preprocessing is ``CLIPImageProcessor``'s
(:func:`..preprocessing.clip_image_processor_preprocess`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import DEFAULT_BATCH_SIZE, RewardModel, example_keys
from .preprocessing import ImagePreprocess, clip_image_processor_preprocess

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
EXPECTED_LAYOUT = (
    "config.json (model_type 'clip'), model.safetensors (or pytorch_model.bin), preprocessor_config.json, and the "
    "tokenizer (tokenizer.json, or vocab.json + merges.txt, with tokenizer_config.json)"
)


class PickScoreReward(RewardModel):
    """PickScore: ``logit_scale.exp() * cos(image, prompt)`` of a transformers CLIPModel (module docstring)."""

    kind = "pickscore"

    def __init__(self, model, tokenizer, name: str, preprocess: ImagePreprocess, batch_size: int = DEFAULT_BATCH_SIZE):
        super().__init__(name, preprocess, batch_size)
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = int(model.config.text_config.max_position_embeddings)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) -> (N, D) L2-normalised projected image embeddings (``get_image_features``)."""
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output  # (N, vision width)
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """N prompts -> (N, D) L2-normalised projected text embeddings (``get_text_features``), padded and truncated
        to the model's context as PickScore's README tokenizes."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.context_length,
                                return_tensors="pt").to(self.device)
        output = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        pooled = output.pooler_output  # (N, text width), the end-of-text token's state
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def combine(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor | None) -> torch.Tensor:
        """(N, D), (N, D) -> (N,) ``exp(logit_scale) * cos``."""
        return self.model.logit_scale.exp().float() * (image_embeddings * text_embeddings).sum(dim=-1)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"'{path}' is not a readable JSON file ({error}).") from error


def _check_model_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"The PickScore folder '{folder}' does not exist (or is a file). A PickScore model is a folder with "
            f"{EXPECTED_LAYOUT}."
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"'{folder}' has no config.json; a PickScore folder holds {EXPECTED_LAYOUT}.")
    model_type = _read_json(config_path).get("model_type")
    if model_type != "clip":
        raise ValueError(
            f"'{config_path}' describes a '{model_type}' model; PickScore is a transformers CLIPModel "
            f"(model_type 'clip'). Choose the PickScore folder (e.g. a download of yuvalkirstain/PickScore_v1)."
        )
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"'{folder}' has a config.json but no weights: expected one of {list(WEIGHT_FILES)}.")


def read_image_processor_config(folder: Path) -> dict:
    """The CLIPImageProcessor settings of a processor folder: ``preprocessor_config.json`` (transformers 4) or the
    ``image_processor`` entry of ``processor_config.json`` (transformers 5)."""
    legacy = folder / "preprocessor_config.json"
    if legacy.is_file():
        return _read_json(legacy)
    combined = folder / "processor_config.json"
    if combined.is_file() and isinstance(_read_json(combined).get("image_processor"), dict):
        return _read_json(combined)["image_processor"]
    raise FileNotFoundError(
        f"'{folder}' has no image processor settings (preprocessor_config.json, or processor_config.json with an "
        f"'image_processor' entry). PickScore uses the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K: copy its "
        f"preprocessor_config.json and tokenizer files into the model folder, or give their folder as processor_folder."
    )


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS):
        raise FileNotFoundError(
            f"'{folder}' has no tokenizer: expected tokenizer.json, or vocab.json + merges.txt (with "
            f"tokenizer_config.json). Copy them from laion/CLIP-ViT-H-14-laion2B-s32B-b79K, as PickScore's README loads."
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"The tokenizer files in '{folder}' could not be loaded ({error}).") from error


def _load_clip_model(folder: Path):
    from transformers import CLIPModel

    use_safetensors = any((folder / name).is_file() for name in WEIGHT_FILES[:2])
    try:
        model, info = CLIPModel.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=use_safetensors, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"The PickScore model in '{folder}' could not be loaded ({error}).") from error
    missing = sorted(key for key in info.get("missing_keys", ()) if not key.endswith("position_ids"))
    unexpected = sorted(key for key in info.get("unexpected_keys", ()) if not key.endswith("position_ids"))
    if missing or info.get("mismatched_keys"):
        raise ValueError(
            f"The weights in '{folder}' do not fit its config.json: {len(missing)} missing (e.g. "
            f"{example_keys(missing)}), {len(info.get('mismatched_keys', ()))} of another shape, {len(unexpected)} "
            f"unexpected (e.g. {example_keys(unexpected)}). Use the config.json that came with these weights."
        )
    return model


def load_pickscore(
    folder: str | os.PathLike, processor_folder: str | os.PathLike | None = None, batch_size: int = DEFAULT_BATCH_SIZE
) -> PickScoreReward:
    """Load a PickScore folder (module docstring for the layout), offline.

    processor_folder: where the processor files are when not in ``folder`` (e.g. a local copy of
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K). Returns a frozen :class:`PickScoreReward` on the CPU in float32.
    """
    folder = Path(folder)
    _check_model_folder(folder)
    processor_folder = Path(processor_folder) if processor_folder is not None else folder
    preprocess = clip_image_processor_preprocess(read_image_processor_config(processor_folder))
    tokenizer = _load_tokenizer(processor_folder)
    model = _load_clip_model(folder)
    logger.info("Loaded PickScore from %s", folder)
    reward = PickScoreReward(model, tokenizer, folder.name, preprocess, batch_size)
    return reward.eval().requires_grad_(False)
