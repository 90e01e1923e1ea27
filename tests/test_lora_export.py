"""LoRA setup (trainers/common/lora.py) and the ComfyUI/diffusers LoRA export (core/lora_export.py) on tiny models.

Every LoRA here has random, non-zero A and B (peft starts B at 0, with which every equality passes trivially).
The ComfyUI side of the format is checked in test_comfyui_lora.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from comfyui_refinery.core.lora_export import export_comfyui_lora, unexportable_modules
from comfyui_refinery.trainers.common.lora import (
    adapters_disabled,
    add_lora,
    lora_parameters,
    set_gradient_checkpointing,
)
from tiny_models import (
    TINY_SD15_UNET,
    TINY_SDXL_UNET,
    lora_deltas,
    randomize_lora,
    read_lora,
    tiny_text_encoder,
    tiny_unet,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# every UNet module kind the exporter can write (core.lora_export.UNET_MODULE_PATTERNS)
ALL_UNET_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "conv_in", "conv_out",
    "time_embedding.linear_1", "time_embedding.linear_2",
)
ALL_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def unet_inputs(config: dict, batch: int = 1, seed: int = 3) -> dict:
    """Fixed inputs for a tiny UNet: latent (B, 4, 8, 8), timestep, context (B, 5, cross_attention_dim)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = dict(sample=torch.randn(batch, 4, 8, 8, generator=generator), timestep=torch.tensor([437] * batch),
                  encoder_hidden_states=torch.randn(batch, 5, config["cross_attention_dim"], generator=generator))
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text (B, 16) + 6 size/crop ids
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 16, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)}
    return inputs


def merge_all(model, adapter_name: str = "default") -> None:
    """peft's merge: W <- W + scaling * B @ A in every LoRA layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[adapter_name])


# -- export: keys, alpha, metadata -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Args:
    rank: int = 4
    learning_rate: float = 1e-4


def test_keys_alpha_and_metadata(tmp_path):
    unet = tiny_unet()
    adapted = add_lora(unet, rank=4, alpha=2.0)
    randomize_lora(unet)
    path = export_comfyui_lora(tmp_path / "lora.safetensors", base_family="sd15", method="rankdpo", unet=unet,
                               training_args=_Args(), metadata={"refinery.note": "hello", "steps": 12})
    tensors, metadata = read_lora(path)

    assert all(name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0") for name in adapted)
    expected = {f"lora_unet_{name.replace('.', '_')}.{suffix}" for name in adapted
                for suffix in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(tensors) == expected
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in tensors
    for name in adapted:
        key = "lora_unet_" + name.replace(".", "_")
        layer = unet.get_submodule(name)
        assert tensors[key + ".alpha"].dtype == torch.float32 and tensors[key + ".alpha"].item() == 2.0
        assert torch.equal(tensors[key + ".lora_down.weight"], layer.lora_A["default"].weight)
        assert torch.equal(tensors[key + ".lora_up.weight"], layer.lora_B["default"].weight)
        assert tensors[key + ".lora_down.weight"].shape[0] == 4 and tensors[key + ".lora_up.weight"].shape[1] == 4
    assert metadata["refinery.base_family"] == "sd15" and metadata["refinery.method"] == "rankdpo"
    assert metadata["refinery.rank"] == "4" and metadata["refinery.alpha"] == "2"
    assert json.loads(metadata["refinery.training_args"]) == {"rank": 4, "learning_rate": 1e-4}
    assert json.loads(metadata["refinery.components"]) == ["unet"]
    assert metadata["refinery.note"] == "hello" and metadata["steps"] == "12"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_base_model_version"] == "sd_v1"
    assert not list(tmp_path.glob("*.tmp"))

    half = export_comfyui_lora(tmp_path / "half.safetensors", base_family="sd15", method="x", unet=unet,
                               dtype=torch.float16)
    half_tensors, _ = read_lora(half)
    assert half_tensors[key + ".lora_down.weight"].dtype == torch.float16
    assert half_tensors[key + ".alpha"].dtype == torch.float32


def test_true_alpha_per_module_rslora_and_patterns(tmp_path):
    """Per-module alpha (peft alpha_pattern/rank_pattern) and rsLoRA (scaling alpha/sqrt(r)) become the alpha whose
    alpha/rank is peft's scaling, the one ComfyUI applies."""
    from peft import LoraConfig

    unet = tiny_unet()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], use_rslora=True,
                                rank_pattern={"to_v": 2}, alpha_pattern={"to_v": 3}))
    randomize_lora(unet)
    path = export_comfyui_lora(tmp_path / "lora.safetensors", base_family="sd15", method="x", unet=unet)
    tensors, metadata = read_lora(path)
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = "lora_unet_" + name.replace(".", "_")
            rank = tensors[key + ".lora_down.weight"].shape[0]
            assert tensors[key + ".alpha"].item() / rank == pytest.approx(module.scaling["default"], rel=1e-6)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    v = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"
    assert tensors[q + ".alpha"].item() == pytest.approx(8 * math.sqrt(4))  # rsLoRA: 8/sqrt(4) = alpha/4
    assert tensors[v + ".alpha"].item() == pytest.approx(3 * math.sqrt(2))
    assert json.loads(metadata["refinery.rank"])[v] == 2 and json.loads(metadata["refinery.rank"])[q] == 4


def test_export_errors(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    unet = tiny_unet()
    add_lora(unet, rank=2)
    target = tmp_path / "lora.safetensors"
    with pytest.raises(ValueError, match="base_family"):
        export_comfyui_lora(target, base_family="sd2", method="x", unet=unet)
    with pytest.raises(ValueError, match="Nothing to export"):
        export_comfyui_lora(target, base_family="sd15", method="x")
    with pytest.raises(ValueError, match="no peft LoRA adapter named 'other'"):
        export_comfyui_lora(target, base_family="sd15", method="x", unet=unet, adapter_name="other")
    with pytest.raises(ValueError, match="text_encoder_2"):
        export_comfyui_lora(target, base_family="sd15", method="x", text_encoders={"text_encoder_2": unet})
    with pytest.raises(ValueError, match="written by the exporter"):
        export_comfyui_lora(target, base_family="sd15", method="x", unet=unet, metadata={"refinery.rank": "9"})
    unet.set_adapters(["default"], weights=[0.5])
    with pytest.raises(ValueError, match="inference scale"):
        export_comfyui_lora(target, base_family="sd15", method="x", unet=unet)
    assert not target.exists()

    xl = tiny_unet(TINY_SDXL_UNET)  # diffusers' kohya converter mangles add_embedding: refused, never dropped
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "add_embedding.linear_1"]), xl)
    with pytest.raises(ValueError, match="add_embedding_linear_1|add_embedding.linear_1"):
        export_comfyui_lora(target, base_family="sdxl", method="x", unet=xl)
    text = tiny_text_encoder()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj", "token_embedding"]), text)
    with pytest.raises(ValueError, match="Embedding LoRA"):
        export_comfyui_lora(target, base_family="sd15", method="x", text_encoders={"text_encoder": text})
    dora = tiny_unet()
    dora.add_adapter(LoraConfig(r=2, target_modules=["to_q"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        export_comfyui_lora(target, base_family="sd15", method="x", unet=dora)
    assert not target.exists()
    assert unexportable_modules(["add_embedding.linear_1", "conv_norm_out", "mid_block.attentions.0.proj_in"]) == [
        "add_embedding.linear_1", "conv_norm_out"]
    assert unexportable_modules(["encoder.layers.31.mlp.fc2", "encoder.layers.32.mlp.fc2",
                                 "embeddings.token_embedding"], "text_encoder") == [
        "encoder.layers.32.mlp.fc2", "embeddings.token_embedding"]


# -- export -> diffusers load_lora_weights == peft merged ------------------------------------------------------
def _sd15_pipeline(unet, text_encoder):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        block_out_channels=(8,))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def test_sd15_export_loads_in_diffusers_and_equals_peft_merged(tmp_path):
    unet, text = tiny_unet(), tiny_text_encoder()
    base_unet, base_text = copy.deepcopy(unet), copy.deepcopy(text)
    adapted = add_lora(unet, rank=4, alpha=3.0, target_modules=ALL_UNET_TARGETS)
    add_lora(text, rank=2, alpha=4.0, target_modules=ALL_TEXT_TARGETS, component="text_encoder")
    assert any(name.endswith("conv_shortcut") for name in adapted) and "conv_in" in adapted
    randomize_lora(unet, text)
    # one real optimiser step on a random loss: the trained A and B (not only their init) are exported
    inputs, ids = unet_inputs(TINY_SD15_UNET), torch.randint(0, 998, (1, 7), generator=torch.Generator().manual_seed(4))
    params = lora_parameters(unet) + lora_parameters(text)
    before = [param.detach().clone() for param in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    loss = unet(**inputs).sample.square().mean() + text(ids)[0].square().mean()
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(old, param) for old, param in zip(before, params))

    path = export_comfyui_lora(tmp_path / "lora.safetensors", base_family="sd15", method="test", unet=unet,
                               text_encoders={"text_encoder": text})
    with torch.no_grad():
        peft_unet, peft_text = unet(**inputs).sample, text(ids)[0]
        merge_all(unet)
        merge_all(text)
        merged_unet, merged_text = unet(**inputs).sample, text(ids)[0]
        base_out = base_unet(**inputs).sample
    torch.testing.assert_close(merged_unet, peft_unet, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_text, peft_text, rtol=1e-5, atol=1e-5)

    pipeline = _sd15_pipeline(base_unet, base_text)
    pipeline.load_lora_weights(str(path))
    with torch.no_grad():
        loaded_unet, loaded_text = pipeline.unet(**inputs).sample, pipeline.text_encoder(ids)[0]
    # fp32 throughout: the only differences are summation orders (W + s B A merged vs x W + s (x A) B)
    torch.testing.assert_close(loaded_unet, merged_unet, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded_text, merged_text, rtol=1e-5, atol=1e-5)
    assert (merged_unet - base_out).abs().max() > 0.05  # the LoRA changes the output: the equality is not vacuous
    expected, loaded = lora_deltas(copy.deepcopy(unet), "default"), lora_deltas(pipeline.unet, "default_0")
    assert set(loaded) == set(expected) == set(adapted)
    for name in adapted:
        torch.testing.assert_close(loaded[name], expected[name], rtol=1e-6, atol=1e-7)
    assert len(lora_deltas(pipeline.text_encoder, "default_0")) == 2 * len(ALL_TEXT_TARGETS)


def test_sdxl_export_loads_in_diffusers(tmp_path):
    """SDXL: UNet (every exportable module kind) and both text encoders (``lora_te1_``/``lora_te2_``) load into a
    tiny StableDiffusionXLPipeline with the same per-module deltas and the same UNet output as peft's."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    unet = tiny_unet(TINY_SDXL_UNET)
    text, text_2 = tiny_text_encoder(), tiny_text_encoder(layers=3, width=16, projection=True, seed=5)
    bases = [copy.deepcopy(model) for model in (unet, text, text_2)]
    add_lora(unet, rank=4, alpha=4.0, target_modules=ALL_UNET_TARGETS)
    add_lora(text, rank=2, target_modules=ALL_TEXT_TARGETS, component="text_encoder")
    add_lora(text_2, rank=2, alpha=1.0, target_modules=ALL_TEXT_TARGETS, component="text_encoder_2")
    randomize_lora(unet, text, text_2)
    path = export_comfyui_lora(tmp_path / "xl.safetensors", base_family="sdxl", method="test", unet=unet,
                               text_encoders={"text_encoder": text, "text_encoder_2": text_2})
    tensors, metadata = read_lora(path)
    assert any(key.startswith("lora_te1_text_model_encoder_layers_0_mlp_fc1.") for key in tensors)
    assert any(key.startswith("lora_te2_text_model_encoder_layers_2_self_attn_out_proj.") for key in tensors)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        block_out_channels=(8,))
    pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=bases[1], text_encoder_2=bases[2], tokenizer=None,
                                         tokenizer_2=None, unet=bases[0], scheduler=EulerDiscreteScheduler())
    pipeline.load_lora_weights(str(path))
    for model, loaded in ((unet, pipeline.unet), (text, pipeline.text_encoder), (text_2, pipeline.text_encoder_2)):
        expected, got = lora_deltas(model, "default"), lora_deltas(loaded, "default_0")
        assert set(got) == set(expected) and expected
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)
    inputs = unet_inputs(TINY_SDXL_UNET)
    with torch.no_grad():
        torch.testing.assert_close(pipeline.unet(**inputs).sample, unet(**inputs).sample, rtol=1e-5, atol=1e-5)


# -- trainers/common/lora.py -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=-2), "rank must be a positive integer"),
    (dict(rank=1.5), "rank must be a positive integer"),
    (dict(rank=True), "rank must be a positive integer"),
    (dict(rank=4, alpha=0), "alpha must be a positive finite"),
    (dict(rank=4, alpha=-1.0), "alpha must be a positive finite"),
    (dict(rank=4, alpha=float("nan")), "alpha must be a positive finite"),
    (dict(rank=4, dropout=1.0), "dropout must be in"),
    (dict(rank=4, target_modules=[]), "non-empty"),
    (dict(rank=4, target_modules=["to_qq"]), "match no module"),
    (dict(rank=4, target_modules=["norm1"]), "not Linear or Conv2d"),
    (dict(rank=4, target_modules=["to_q"], component="vae"), "component must be one of"),
])
def test_add_lora_rejects_bad_settings(kwargs, message):
    unet = tiny_unet()
    with pytest.raises(ValueError, match=message):
        add_lora(unet, **kwargs)
    assert not any("lora_" in name for name, _ in unet.named_parameters())  # refused before touching the model


def test_add_lora_refuses_unexportable_targets():
    xl = tiny_unet(TINY_SDXL_UNET)
    with pytest.raises(ValueError, match="cannot write.*add_embedding"):
        add_lora(xl, rank=2, target_modules=["to_q", "linear_1"])  # linear_1 also matches add_embedding.linear_1
    text = tiny_text_encoder()
    with pytest.raises(ValueError, match="not Linear or Conv2d"):
        add_lora(text, rank=2, target_modules=["token_embedding"], component="text_encoder")


def test_add_lora_freezes_base_and_defaults():
    unet = tiny_unet()
    adapted = add_lora(unet, rank=3)
    assert adapted and all(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name in adapted)
    trainable = [name for name, param in unet.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    layer = unet.get_submodule(adapted[0])
    assert layer.scaling["default"] == 1.0 and layer.r["default"] == 3  # alpha defaults to the rank
    assert len(lora_parameters(unet)) == 2 * len(adapted)


def test_adapters_disabled_is_the_base_model_and_restores():
    unet = tiny_unet()
    base = copy.deepcopy(unet)
    add_lora(unet, rank=4)
    randomize_lora(unet)
    inputs = unet_inputs(TINY_SD15_UNET)
    with torch.no_grad():
        with_lora, base_out = unet(**inputs).sample, base(**inputs).sample
        with adapters_disabled(unet):
            torch.testing.assert_close(unet(**inputs).sample, base_out, rtol=0, atol=0)
            assert not lora_parameters(unet)
        torch.testing.assert_close(unet(**inputs).sample, with_lora, rtol=0, atol=0)
    flags = {name: param.requires_grad for name, param in unet.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), adapters_disabled(unet):
        raise RuntimeError("boom")
    assert {name: param.requires_grad for name, param in unet.named_parameters()} == flags
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, with_lora, rtol=0, atol=0)

    # a frozen adapter stays frozen after the block (peft's enable_adapters would make it trainable again)
    for param in lora_parameters(unet):
        param.requires_grad_(False)
    with adapters_disabled(unet):
        pass
    assert not lora_parameters(unet)
    with pytest.raises(ValueError, match="no peft adapter"), adapters_disabled(base):
        pass


def test_gradient_checkpointing_toggle_keeps_gradients():
    unet = tiny_unet()
    add_lora(unet, rank=2)
    randomize_lora(unet)
    unet.train()
    inputs = unet_inputs(TINY_SD15_UNET)

    def lora_grads():
        unet.zero_grad(set_to_none=True)
        unet(**inputs).sample.square().mean().backward()
        return [param.grad.clone() for param in lora_parameters(unet)]

    plain = lora_grads()
    set_gradient_checkpointing(unet, True)
    assert unet.is_gradient_checkpointing
    checkpointed = lora_grads()
    set_gradient_checkpointing(unet, False)
    assert not unet.is_gradient_checkpointing
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    text = tiny_text_encoder()
    add_lora(text, rank=2, component="text_encoder")
    randomize_lora(text)
    text.train()
    ids = torch.randint(0, 998, (2, 7), generator=torch.Generator().manual_seed(4))

    def text_grads():
        text.zero_grad(set_to_none=True)
        text(ids)[0].square().mean().backward()
        return [param.grad.clone() for param in lora_parameters(text)]

    plain = text_grads()
    set_gradient_checkpointing(text, True)
    checkpointed = text_grads()
    assert any(module.gradient_checkpointing for module in text.modules() if hasattr(module, "gradient_checkpointing"))
    set_gradient_checkpointing(text, False)
    assert not any(getattr(module, "gradient_checkpointing", False) for module in text.modules())
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="gradient checkpointing"):
        set_gradient_checkpointing(torch.nn.Linear(2, 2), True)
