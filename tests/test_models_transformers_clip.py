"""transformers ``CLIPModel`` weights as the quality CLIP: converted on load to open_clip's ViT and text tower, in
every layout a user may have (a save_pretrained folder, its model.safetensors, a lone renamed file with its config,
wrapped keys, shards, or OpenAI's shapes without a config), with global image and text embeddings equal to
transformers' own ``get_image_features`` / ``get_text_features``.

The models are tiny and random (``tiny_models.build_tiny_transformers_clip``: every parameter perturbed, head widths
that differ between the towers), so a swapped q/k/v, a missed layer norm, a transposed projection, a wrong head
count or activation all show in the embeddings."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from ci import importorskip

from comfyui_refinery.core import open_clip_files
from comfyui_refinery.core.clip_surgery import load_quality_clip
from comfyui_refinery.core.weights import state_dict_mismatch
from tiny_models import build_tiny_transformers_clip

importorskip("transformers")  # under CI a missing test dependency fails

TEXTS = ["a red fox on a mossy rock", "", "Two BLUE squares, one (green) circle!"]
TOLERANCE = 1e-5
ACTIVATIONS = {"quick_gelu": dict(hidden_act="quick_gelu"),
               "gelu-eps1e-6": dict(hidden_act="gelu", layer_norm_eps=1e-6)}
OPENAI_CONFIGS = {  # the towers of openai/clip-vit-* config.json files (transformers fills in the rest by default)
    "ViT-B-32-quickgelu": {"projection_dim": 512, "vision_config": {"patch_size": 32}},
    "ViT-B-16-quickgelu": {"projection_dim": 512, "vision_config": {"patch_size": 16},
                           "vision_config_dict": {"patch_size": 16}},  # the older layout of that repo's config
    "ViT-L-14-quickgelu": {"projection_dim": 768,
                           "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
                           "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                             "num_hidden_layers": 24, "patch_size": 14}},
    "ViT-L-14-336-quickgelu": {"projection_dim": 768,
                               "text_config": {"hidden_size": 768, "intermediate_size": 3072,
                                               "num_attention_heads": 12},
                               "vision_config": {"hidden_size": 1024, "intermediate_size": 4096,
                                                 "num_attention_heads": 16, "num_hidden_layers": 24,
                                                 "patch_size": 14, "image_size": 336}},
}


def features(output) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is it (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def assert_same_embeddings(encoder, reference) -> None:
    """Global image and text embeddings (raw and as SurgeryCLIP gives them) and the temperature equal the
    transformers model's within TOLERANCE."""
    images = torch.rand(2, 40, 28, 3, generator=torch.Generator().manual_seed(0))
    pixels = encoder.preprocess(images)  # (2, 3, 32, 32), CLIP-normalised
    tokens = encoder.tokenizer(TEXTS)  # (3, 77) CLIP BPE ids
    with torch.no_grad():
        image_reference = features(reference.get_image_features(pixel_values=pixels))
        text_reference = features(reference.get_text_features(input_ids=tokens))
        torch.testing.assert_close(encoder.model.encode_image(pixels), image_reference, rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(encoder.model.encode_text(tokens), text_reference, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(encoder.encode_image(images).cls_embedding, F.normalize(image_reference, dim=-1),
                               rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(encoder.encode_text(TEXTS), F.normalize(text_reference, dim=-1), rtol=0, atol=TOLERANCE)
    assert encoder.logit_scale == pytest.approx(float(reference.logit_scale.detach().exp()), rel=1e-6)
    assert encoder.encode_image(images).patch_features.shape == (2, 4, 4, 24)  # surgery runs on the converted tower


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("layout", ["folder", "model.safetensors", "lone file + <stem>.json", "prefixed keys"])
def test_embeddings_equal_transformers_in_every_layout(tmp_path, layout, activation):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "hf-clip"
    reference = build_tiny_transformers_clip(folder, **ACTIVATIONS[activation])
    if layout == "folder":
        checkpoint = folder
    elif layout == "model.safetensors":
        checkpoint = folder / "model.safetensors"
    elif layout == "lone file + <stem>.json":  # a renamed model.safetensors with its config.json renamed alike
        checkpoint = tmp_path / "lone" / "my-clip.safetensors"
        checkpoint.parent.mkdir()
        shutil.copy(folder / "model.safetensors", checkpoint)
        shutil.copy(folder / "config.json", checkpoint.with_suffix(".json"))
    else:  # keys under a wrapper prefix, with the position_ids buffers older transformers saved
        state = load_file(str(folder / "model.safetensors"))
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        checkpoint = tmp_path / "wrapped" / "wrapped.safetensors"
        checkpoint.parent.mkdir()
        save_file({f"clip.{key}": value for key, value in state.items()}, str(checkpoint))
        shutil.copy(folder / "config.json", checkpoint.with_suffix(".json"))

    encoder = load_quality_clip(checkpoint)

    assert_same_embeddings(encoder, reference)
    assert encoder.surgery_depth == 3  # the last 6 blocks (METHODS.md 1.1): all 3 image blocks here
    assert encoder.architecture.startswith("transformers CLIP")


def test_a_torch_bin_and_a_sharded_folder_load_too(tmp_path):
    reference = build_tiny_transformers_clip(tmp_path / "bin")
    torch.save(reference.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    assert_same_embeddings(load_quality_clip(tmp_path / "bin"), reference)

    reference.save_pretrained(str(tmp_path / "sharded"), max_shard_size="2MB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_same_embeddings(load_quality_clip(tmp_path / "sharded"), reference)
    assert_same_embeddings(load_quality_clip(shards[-1]), reference)  # one shard picked in a file list: all are read
    assert set(shards) <= set(open_clip_files.checkpoint_files(shards[0]))


def test_image_normalisation_comes_from_the_preprocessor_config(tmp_path):
    build_tiny_transformers_clip(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5],
                                                                   "image_std": [0.25, 0.25, 0.25]}))
    encoder = load_quality_clip(tmp_path)
    assert encoder._mean.flatten().tolist() == [0.5, 0.5, 0.5] and encoder._std.flatten().tolist() == [0.25] * 3
    assert tmp_path / "preprocessor_config.json" in open_clip_files.checkpoint_files(tmp_path / "model.safetensors")


def test_a_lone_file_of_unknown_shapes_without_config_is_refused_with_what_to_do(tmp_path):
    build_tiny_transformers_clip(tmp_path / "hf")
    lone = tmp_path / "alone" / "clip.safetensors"
    lone.parent.mkdir()
    shutil.copy(tmp_path / "hf" / "model.safetensors", lone)
    with pytest.raises(ValueError, match=r"'clip.safetensors' is a transformers CLIPModel state dict without its "
                                         r"config.*config.json beside it.*open_clip architecture"):
        load_quality_clip(lone)


def test_a_lone_file_with_a_release_shape_loads_as_that_release(tmp_path, monkeypatch):
    """The shape inference, end to end on tiny weights: a registered open_clip config with the tiny model's shapes
    stands in for OpenAI's releases (whose real sizes are checked without weights below)."""
    import open_clip

    reference = build_tiny_transformers_clip(tmp_path / "hf")
    config = open_clip_files.open_clip_config_from_transformers(json.loads((tmp_path / "hf" / "config.json").read_text()))
    (tmp_path / "tiny-openai-like.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / "tiny-openai-like.json"))
    monkeypatch.setattr(open_clip_files, "OPENAI_RELEASES", ("ViT-B-16-quickgelu", "tiny-openai-like"))
    lone = tmp_path / "alone" / "model.safetensors"
    lone.parent.mkdir()
    shutil.copy(tmp_path / "hf" / "model.safetensors", lone)

    encoder = load_quality_clip(lone)

    assert encoder.architecture == "tiny-openai-like"
    assert_same_embeddings(encoder, reference)
    # the same weights under an explicitly chosen open_clip architecture
    assert_same_embeddings(load_quality_clip(lone, "tiny-openai-like"), reference)
    with pytest.raises(ValueError, match=r"transformers CLIPModel layout\) does not match architecture 'ViT-B-16'"):
        load_quality_clip(lone, "ViT-B-16")


@pytest.mark.parametrize("release", list(OPENAI_CONFIGS))
def test_openai_releases_are_recognised_from_their_config_and_their_shapes(release):
    """OpenAI's released CLIPs (as transformers config dicts and as meta-device state dicts, no weights): the
    config converts to the open_clip architecture of the same name, the shapes alone name it too, and the converted
    keys and shapes are exactly that open_clip model's."""
    import open_clip
    from open_clip.model import CLIP
    from transformers import CLIPConfig, CLIPModel

    hf_config = {"model_type": "clip", "text_config": {}, **OPENAI_CONFIGS[release]}
    converted_config = open_clip_files.open_clip_config_from_transformers(hf_config)
    assert open_clip_files.open_clip_name_of(converted_config) == release
    towers = {key: value for key, value in OPENAI_CONFIGS[release].items() if not key.endswith("_dict")}
    with torch.device("meta"):
        hf_model = CLIPModel(CLIPConfig(**towers))
        open_clip_model = CLIP(**open_clip.get_model_config(release))
    converted = open_clip_files.convert_transformers_clip(hf_model.state_dict())
    assert open_clip_files.openai_release_of(converted) == release
    assert state_dict_mismatch(converted, open_clip_model.state_dict()) is None


def test_an_image_only_checkpoint_is_refused(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from tiny_models import TINY_TRANSFORMERS_CLIP

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_TRANSFORMERS_CLIP["vision_config"],
                                                           projection_dim=24))
    model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"only a CLIP image tower.*needs the text tower"):
        load_quality_clip(tmp_path)


def test_a_config_that_does_not_match_its_weights_names_both(tmp_path):
    build_tiny_transformers_clip(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'model.safetensors' \(transformers CLIPModel layout\) does not match "
                                         r"architecture 'transformers CLIP '.*missing.*"
                                         r"put the model.s own transformers config.json"):
        load_quality_clip(tmp_path / "model.safetensors")


@pytest.mark.parametrize(("change", "message"), [
    ({"vision_config": {"hidden_act": "gelu_new"}}, "activation"),
    ({"text_config": {"vocab_size": 32000}}, "not CLIP's 49408 BPE tokens"),
    ({"model_type": "siglip"}, "not a transformers CLIPModel config"),
])
def test_configs_open_clip_cannot_express_are_refused(change, message):
    config = {"model_type": "clip", "text_config": {}, "vision_config": {}}
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ValueError, match=message):
        open_clip_files.open_clip_config_from_transformers(config)


def test_the_defaults_are_transformers_own():
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text, vision = CLIPTextConfig(), CLIPVisionConfig()
    assert {key: getattr(text, key) for key in open_clip_files.TRANSFORMERS_TEXT_DEFAULTS} == \
        open_clip_files.TRANSFORMERS_TEXT_DEFAULTS
    assert {key: getattr(vision, key) for key in open_clip_files.TRANSFORMERS_VISION_DEFAULTS} == \
        open_clip_files.TRANSFORMERS_VISION_DEFAULTS
    assert CLIPConfig().projection_dim == open_clip_files.TRANSFORMERS_PROJECTION_DEFAULT


def test_open_clip_tokenizer_gives_the_ids_of_transformers_clip_tokenizer():
    """CLIPTokenizer (transformers' own pre-tokenizer and BPE) over CLIP's vocabulary (open_clip's BPE file, special
    tokens named as in openai/clip-vit-*'s vocab.json) gives open_clip's ids up to the end-of-text token, and a
    converted model is fed those ids."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    vocabulary = {{"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}.get(token, token): index
                  for token, index in bpe.encoder.items()}
    tokenizer = CLIPTokenizer(vocab=vocabulary, merges=sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get))
    texts = TEXTS + ["photo of an astronaut riding a horse on mars 1234", "it's a dog's life, isn't it?",
                     "café naïve   spaces\tand tabs"]
    reference = tokenizer(texts)["input_ids"]
    ours = open_clip.get_tokenizer("ViT-B-16-quickgelu")(texts)  # (N, 77), zero-padded after end-of-text
    for ids, row in zip(reference, ours):
        assert row[: int(row.argmax()) + 1].tolist() == ids
