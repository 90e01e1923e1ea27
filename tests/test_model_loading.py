"""trainers/common/model_loading.py: family detection, the shipped config folders, diffusers folders, and a real
ComfyUI single-file SD1.5 checkpoint (the ``comfyui`` tests)."""

from __future__ import annotations

import json

import pytest
import torch
from comfyui_refinery.trainers.common.model_loading import (
    UNET_PREFIX,
    UnsupportedModelError,
    detect_family,
    diffusers_config_folder,
    family_from_shapes,
    load_sd_pipeline,
    pipeline_family,
)
from tiny_models import TINY_SDXL_UNET, tiny_text_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

U = UNET_PREFIX
SD15_TEXT = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}
SDXL_TEXT = {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
             "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280)}


def _unet(context: int, conv_in: int = 4, label: int | None = None, width: int = 320) -> dict:
    shapes = {U + "input_blocks.0.0.weight": (width, conv_in, 3, 3),
              U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (width, context)}
    if label is not None:
        shapes[U + "label_emb.0.0.weight"] = (4 * width, label)
    return shapes


def test_family_from_shapes_accepts_sd15_and_sdxl():
    assert family_from_shapes({**_unet(768), **SD15_TEXT}) == "sd15"
    assert family_from_shapes({**_unet(2048, label=2816), **SDXL_TEXT}) == "sdxl"


@pytest.mark.parametrize("shapes, message", [
    ({**_unet(1024), "cond_stage_model.model.token_embedding.weight": (49408, 1024)},
     r"Stable Diffusion 2\.x .*context width \[1024\].*unsupported family"),
    ({**_unet(1280, label=2560, width=384), "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)},
     "SDXL refiner .*label_emb inputs 2560"),
    ({**_unet(768, conv_in=9), **SD15_TEXT}, "9 input channels .*unsupported family"),
    ({U + "double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "Flux model: unsupported family"),
    ({U + "joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}, "SD3 / SD3.5 .*unsupported family"),
    ({"transformer_blocks.0.attn.to_q.weight": (3072, 3072)}, "diffusion transformer in diffusers layout"),
    ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "UNet alone in diffusers layout"),
    ({"input_blocks.0.0.weight": (320, 4, 3, 3)}, "UNet alone in ComfyUI layout"),
    ({"encoder.conv_in.weight": (128, 3, 3, 3)}, r"no Stable-Diffusion UNet \(first keys"),
    (_unet(768), "looks like sd15 .*lacks the CLIP-L text encoder"),
    ({**_unet(2048, label=2816), "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight":
      (49408, 768)}, "lacks the OpenCLIP-G text encoder"),
    ({**_unet(512), **SD15_TEXT}, r"no SD1\.5 or SDXL base model \(UNet context width \[512\]"),
])
def test_family_from_shapes_names_what_it_found(shapes, message):
    with pytest.raises(UnsupportedModelError, match=message):
        family_from_shapes(shapes)


def test_unsupported_files_and_folders(tmp_path):
    from safetensors.torch import save_file

    sd2 = tmp_path / "sd2-like.safetensors"  # a real file with SD2's UNet context width: refused from its header
    save_file({key: torch.zeros(shape, dtype=torch.float16) for key, shape in
               {**_unet(1024), "cond_stage_model.model.token_embedding.weight": (8, 1024)}.items()}, str(sd2))
    with pytest.raises(UnsupportedModelError, match=r"'sd2-like.safetensors' is a Stable Diffusion 2\.x model"):
        load_sd_pipeline(sd2)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00\x01not a safetensors header" * 10)
    with pytest.raises(UnsupportedModelError, match="not a readable safetensors file"):
        detect_family(broken)
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"0")
    with pytest.raises(UnsupportedModelError, match=r"\.ckpt, \.pt\) are not read"):
        detect_family(pickled)
    with pytest.raises(FileNotFoundError, match="models/checkpoints"):
        detect_family(tmp_path / "missing.safetensors")
    with pytest.raises(UnsupportedModelError, match="no model_index.json"):
        detect_family(tmp_path)

    sd2_folder = tmp_path / "sd2-folder"
    (sd2_folder / "unet").mkdir(parents=True)
    (sd2_folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (sd2_folder / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1024, "in_channels": 4}))
    with pytest.raises(UnsupportedModelError, match=r"Stable Diffusion 2\.x model \(pipeline class "
                                                   r"StableDiffusionPipeline, UNet context 1024"):
        load_sd_pipeline(sd2_folder)
    (sd2_folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(UnsupportedModelError, match="holds a StableDiffusion3Pipeline"):
        load_sd_pipeline(sd2_folder)
    with pytest.raises(ValueError, match="family must be"):
        load_sd_pipeline(sd2_folder, family="sd2")


@pytest.mark.parametrize("family, parameters", [
    # published parameter counts of SD1.5's UNet / CLIP-L text tower and SDXL base's UNet / OpenCLIP-G text tower
    ("sd15", {"unet": 859_520_964, "text_encoder": 123_060_480}),
    ("sdxl", {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}),
])
def test_config_folders(tmp_path, family, parameters):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = diffusers_config_folder(family, tmp_path)
    assert diffusers_config_folder(family, tmp_path) == folder  # built once, then reused
    assert not [path for path in tmp_path.iterdir() if ".tmp-" in path.name]
    index = json.loads((folder / "model_index.json").read_text())
    classes = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    for name, expected in parameters.items():
        assert index[name][1] == classes[name].__name__
        with init_empty_weights():
            if name == "unet":
                model = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / name))
            else:
                model = classes[name](CLIPTextConfig.from_pretrained(folder / name))
        assert sum(param.numel() for param in model.parameters()) == expected, name
    with init_empty_weights():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    assert sum(param.numel() for param in vae.parameters()) == 83_653_863
    for name in [key for key in index if key.startswith("tokenizer")]:
        tokenizer = CLIPTokenizer.from_pretrained(folder / name)
        assert tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
        assert tokenizer.model_max_length == 77
        assert tokenizer.pad_token == ("!" if name == "tokenizer_2" else "<|endoftext|>")
    assert sorted(key for key in index if key.startswith("tokenizer")) == (
        ["tokenizer", "tokenizer_2"] if family == "sdxl" else ["tokenizer"])


def test_diffusers_folders(tmp_path):
    """The toy world's committed tiny SD folder loads as sd15; a saved tiny SDXL pipeline loads as sdxl; weights
    equal the files'; a stated family that does not match is refused."""
    from comfyui_refinery.benchmarks.toyworld.data import TOY_SD_FOLDER
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    pipeline = load_sd_pipeline(TOY_SD_FOLDER)
    assert type(pipeline) is StableDiffusionPipeline and pipeline_family(pipeline) == "sd15"
    assert detect_family(TOY_SD_FOLDER) == "sd15"
    files = sorted((TOY_SD_FOLDER / "unet").glob("*.safetensors"))
    state = load_file(str(files[0]))
    for key, value in pipeline.unet.state_dict().items():
        assert torch.equal(value, state[key].to(value.dtype)), key
    with pytest.raises(UnsupportedModelError, match="family='sdxl' was asked for, but .* is a sd15 model"):
        load_sd_pipeline(TOY_SD_FOLDER, family="sdxl")

    tokenizer_folder = diffusers_config_folder("sdxl", tmp_path / "configs")
    torch.manual_seed(0)
    xl = StableDiffusionXLPipeline(
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                          down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                          block_out_channels=(8,)),
        text_encoder=tiny_text_encoder(), text_encoder_2=tiny_text_encoder(layers=3, width=16, projection=True),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_folder / "tokenizer_2"),
        unet=UNet2DConditionModel(**TINY_SDXL_UNET), scheduler=EulerDiscreteScheduler(),
    )
    xl.save_pretrained(tmp_path / "tiny-xl")
    loaded = load_sd_pipeline(tmp_path / "tiny-xl", family="sdxl")
    assert type(loaded) is StableDiffusionXLPipeline and pipeline_family(loaded) == "sdxl"
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        expected = getattr(xl, name).state_dict()
        for key, value in getattr(loaded, name).state_dict().items():
            assert torch.equal(value, expected[key]), (name, key)


# -- a real ComfyUI single-file checkpoint ---------------------------------------------------------------------
@pytest.mark.comfyui
def test_single_file_sd15_checkpoint_loads_with_the_files_weights(sd15_checkpoint, tmp_path):
    """The random SD1.5 checkpoint that ComfyUI's CheckpointSave wrote loads offline as a StableDiffusionPipeline
    whose every UNet and text-encoder tensor equals the file's, matched through ComfyUI's own key map."""
    import comfy.model_detection
    import comfy.utils
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    assert detect_family(sd15_checkpoint) == "sd15"
    pipeline = load_sd_pipeline(sd15_checkpoint, dtype=torch.float16, cache_dir=tmp_path)
    assert type(pipeline) is StableDiffusionPipeline and pipeline_family(pipeline) == "sd15"
    assert pipeline.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]

    with safe_open(str(sd15_checkpoint), "pt") as handle:
        keys = set(handle.keys())
        unet_keys = [key for key in keys if key.startswith(U)]
        shapes = {key: handle.get_slice(key).get_shape() for key in unet_keys}
        unet_config = comfy.model_detection.detect_unet_config(
            {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}, U)
        to_comfy = comfy.utils.unet_to_diffusers(unet_config)  # diffusers key -> ComfyUI key
        unet_state = pipeline.unet.state_dict()
        assert set(unet_state) <= set(to_comfy)  # the map also names modules SD1.5 lacks (label_emb, ...)
        assert {U + to_comfy[key] for key in unet_state} == set(unet_keys)  # every UNet tensor of the file is used
        for key, value in unet_state.items():
            assert torch.equal(value, handle.get_tensor(U + to_comfy[key])), key
        text_prefix = "cond_stage_model.transformer.text_model."
        for key, value in pipeline.text_encoder.state_dict().items():
            file_key = text_prefix + key.removeprefix("text_model.")
            if file_key in keys:  # position_ids is a buffer ComfyUI does not save
                assert torch.equal(value, handle.get_tensor(file_key)), key
            else:
                assert key.endswith("position_ids"), key
        for key in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight"):
            assert torch.equal(pipeline.vae.state_dict()[key], handle.get_tensor("first_stage_model." + key))


@pytest.mark.comfyui
def test_sdxl_config_folder_matches_a_comfyui_sdxl_checkpoint_layout(comfy_harness, tmp_path):
    """No full-size SDXL checkpoint is built on this CPU (about 7 GB). Instead: ComfyUI's own SDXL model and CLIP,
    on the meta device, give the key names and shapes of the checkpoint CheckpointSave writes; diffusers'
    single-file converters (the functions ``from_single_file`` calls) map them onto models built from the
    shipped SDXL configs, and every converted key and shape must equal the model's."""
    import comfy.model_detection
    import comfy.sdxl_clip
    import comfy.supported_models
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = diffusers_config_folder("sdxl", tmp_path)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    model_config = comfy.model_detection.model_config_from_diffusers_unet(unet.state_dict())
    assert isinstance(model_config, comfy.supported_models.SDXL)
    model = model_config.get_model({}, "", device="meta")
    clip = comfy.sdxl_clip.SDXLClipModel(device="meta")
    checkpoint = model.state_dict_for_saving(clip_state_dict=clip.state_dict(), vae_state_dict={})
    assert family_from_shapes({key: tuple(value.shape) for key, value in checkpoint.items()}) == "sdxl"
    assert infer_diffusers_model_type(checkpoint) == "xl_base"

    def same_layout(converted: dict, target: torch.nn.Module, name: str) -> None:
        expected = {key: tuple(value.shape) for key, value in target.state_dict().items()
                    if not key.endswith("position_ids")}
        got = {key: tuple(value.shape) for key, value in converted.items() if not key.endswith("position_ids")}
        assert got == expected, (name, sorted(set(got) ^ set(expected))[:5])

    same_layout(convert_ldm_unet_checkpoint(checkpoint, unet.config), unet, "unet")
    converted = convert_ldm_clip_checkpoint(checkpoint)  # SDXL's CLIP-L under conditioner.embedders.0.transformer.
    same_layout({key.removeprefix("text_model."): value for key, value in converted.items()}
                if not hasattr(text, "text_model") else converted, text, "text_encoder")
    same_layout(convert_open_clip_checkpoint(text_2, checkpoint, prefix="conditioner.embedders.1.model."), text_2,
                "text_encoder_2")
