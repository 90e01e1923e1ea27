"""CLIP-Surgery encoder (g-refine.txt eq. 1): equality of the CLS path, the v-v path against a naive
re-implementation, text encoding through token embeddings, and loading errors."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from comfyui_refinery.core import clip_surgery
from comfyui_refinery.core.clip_surgery import SurgeryCLIP, load_quality_clip
from tiny_models import TINY_VIT_CONFIG, build_tiny_vit, torch_threads


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return build_tiny_vit(tmp_path_factory.mktemp("quality_clip"))


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint):
    return load_quality_clip(tiny_checkpoint)


def naive_surgery_patches(model, pixels, depth):
    """Independent per-head, per-token loop version of the CLIP-Surgery patch path (eq. 1)."""
    visual = model.visual
    x = visual._embeds(pixels)
    blocks = visual.transformer.resblocks
    surgery = None
    for index, block in enumerate(blocks):
        if index >= len(blocks) - depth:
            surgery = x.clone() if surgery is None else surgery
            hidden = block.ln_1(x)
            width, heads = block.attn.embed_dim, block.attn.num_heads
            head_dim = width // heads
            w_v = block.attn.in_proj_weight[2 * width :]
            b_v = block.attn.in_proj_bias[2 * width :]
            values = hidden @ w_v.T + b_v
            out = torch.zeros_like(values)
            for head in range(heads):
                v = values[..., head * head_dim : (head + 1) * head_dim]  # (B, L, hd)
                weights = torch.softmax(v @ v.transpose(1, 2) / math.sqrt(head_dim), dim=-1)
                out[..., head * head_dim : (head + 1) * head_dim] = weights @ v
            surgery = surgery + block.attn.out_proj(out)
        x = block(x)
    patches = visual.ln_post(surgery[:, 1:]) @ visual.proj
    return F.normalize(patches, dim=-1)


def test_cls_embedding_equals_unmodified_model(encoder):
    images = torch.rand(3, 40, 56, 3)
    features = encoder.encode_image(images)
    with torch.no_grad():
        reference = F.normalize(encoder.model.encode_image(encoder.preprocess(images)), dim=-1)
    torch.testing.assert_close(features.cls_embedding, reference, rtol=0, atol=1e-6)


def test_patch_features_match_naive_surgery(encoder):
    images = torch.rand(2, 32, 32, 3)
    features = encoder.encode_image(images)
    with torch.no_grad():
        expected = naive_surgery_patches(encoder.model, encoder.preprocess(images), encoder.surgery_depth)
    assert features.patch_features.shape == (2, 4, 4, 32)
    torch.testing.assert_close(features.patch_features.reshape(2, 16, 32), expected, rtol=1e-5, atol=1e-5)
    # the surgery path really differs from plain patch tokens
    with torch.no_grad():
        plain = encoder.model.visual.ln_post(encoder.model.visual.transformer(encoder.model.visual._embeds(
            encoder.preprocess(images)))[:, 1:]) @ encoder.model.visual.proj
    assert not torch.allclose(F.normalize(plain, dim=-1), expected, atol=1e-3)


def test_default_depth_is_the_last_six_blocks_and_validated(encoder):
    import copy

    assert encoder.surgery_depth == 4  # METHODS.md 1.1: the last 6 blocks, here every block of a 4-block tower
    deeper = copy.deepcopy(encoder.model)
    blocks = deeper.visual.transformer.resblocks
    for block in list(blocks):  # 8 blocks
        blocks.append(copy.deepcopy(block))
    assert SurgeryCLIP(deeper, encoder.architecture).surgery_depth == 6
    with pytest.raises(ValueError, match="surgery_depth must be in"):
        SurgeryCLIP(encoder.model, encoder.architecture, surgery_depth=5)


def test_token_embedding_path_equals_encode_text(encoder):
    texts = ["a red circle", "", "two blue squares on a striped background"]
    embeddings, eot = encoder.token_embeddings(texts)
    with torch.no_grad():
        through_embeddings = encoder.encode_token_embeddings(embeddings, eot)
    torch.testing.assert_close(through_embeddings, encoder.encode_text(texts), rtol=0, atol=1e-6)


def test_text_features_are_cached(encoder):
    first = encoder.encode_text(["a cat"])
    encoder.model.token_embedding.weight.data.add_(1.0)  # a cached text must not be recomputed
    try:
        torch.testing.assert_close(encoder.encode_text(["a cat"]), first)
    finally:
        encoder.model.token_embedding.weight.data.sub_(1.0)


def test_wrong_width_embeddings_are_refused(encoder):
    with pytest.raises(ValueError, match=r"made for another CLIP.*text prompts"):
        encoder.encode_token_embeddings(torch.zeros(2, 77, 512), torch.tensor([5, 5]))


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_quality_clip(tmp_path / "nothing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_quality_clip(corrupt, "ViT-B-16")


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weights": Payload()}, path)
    with pytest.raises(ValueError, match="pickled code"):
        load_quality_clip(path, "ViT-B-16")


def test_architecture_mismatch_names_the_problem(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"does not match architecture 'ViT-B-16'.*missing"):
        load_quality_clip(tiny_checkpoint, "ViT-B-16")
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(tiny_checkpoint.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"'auto' needs an open_clip model config 'lonely.json'"):
        load_quality_clip(lonely)
    with pytest.raises(ValueError, match="Unknown open_clip architecture"):
        load_quality_clip(tiny_checkpoint, "ViT-Nope")


def test_non_vit_tower_is_refused(tmp_path):
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
        "text_cfg": TINY_VIT_CONFIG["text_cfg"],
    }
    checkpoint = build_tiny_vit(tmp_path, "tiny-resnet", config)
    with pytest.raises(ValueError, match="CLIP-Surgery needs an open_clip ViT"):
        load_quality_clip(checkpoint)


def test_list_architectures_holds_vits_only():
    names = clip_surgery.list_architectures()
    assert "ViT-B-16" in names and "ViT-L-14" in names
    assert "RN50" not in names


def test_wrapped_and_prefixed_state_dicts_load(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(tiny_checkpoint))
    path = tmp_path / "tiny-vit.pt"
    torch.save({"state_dict": {f"module.{key}": value for key, value in state.items()}}, path)
    (tmp_path / "tiny-vit.json").write_text(tiny_checkpoint.with_suffix(".json").read_text())
    encoder = load_quality_clip(path)
    assert encoder.architecture == "tiny-vit"
    assert pickle is not None


def test_auto_config_may_not_replace_a_builtin_architecture(tiny_checkpoint, tmp_path):
    import open_clip

    impostor = tmp_path / "ViT-B-16.safetensors"
    impostor.write_bytes(tiny_checkpoint.read_bytes())
    impostor.with_suffix(".json").write_text(tiny_checkpoint.with_suffix(".json").read_text())
    with pytest.raises(ValueError, match="describes another model than open_clip's own architecture 'ViT-B-16'"):
        load_quality_clip(impostor)
    assert open_clip.get_model_config("ViT-B-16")["vision_cfg"]["width"] == 768


def test_plain_patch_tokens_without_surgery(encoder):
    images = torch.rand(2, 32, 32, 3)
    plain = encoder.encode_image(images, use_surgery=False)
    with torch.no_grad():
        visual = encoder.model.visual
        tokens = visual.transformer(visual._embeds(encoder.preprocess(images)))[:, 1:]
        expected = F.normalize(visual.ln_post(tokens) @ visual.proj, dim=-1).reshape(2, 4, 4, -1)
    torch.testing.assert_close(plain.patch_features, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.cls_embedding, encoder.encode_image(images).cls_embedding)


@pytest.mark.parametrize(("damage", "reason"), [
    ("cut", r"not a readable safetensors file: it is a safetensors file cut short \([\d,]+ bytes, its header "
            r"announces [\d,]+\)"),
    ("text", r"not a readable safetensors file: it is a text file \(\d+ bytes, starting 'I am not a checkpoint\.'"),
    ("random bytes", r"not a readable safetensors file: it is neither a torch archive nor a safetensors file .*corrupt"),
])
def test_a_damaged_checkpoint_is_named_with_what_is_wrong(tiny_checkpoint, tmp_path, damage, reason):
    damaged = tmp_path / "damaged.safetensors"
    whole = tiny_checkpoint.read_bytes()
    damaged.write_bytes({"cut": whole[: len(whole) // 2], "text": b"I am not a checkpoint.\n",
                         "random bytes": bytes(range(7, 256)) * 16}[damage])
    with pytest.raises(ValueError, match=f"'damaged.safetensors' is {reason}"):
        load_quality_clip(damaged, "ViT-B-16")


def test_a_picture_gets_the_same_features_anywhere_in_a_batch(encoder):
    """The shortened last block (CLS token only) keeps what the full forward guaranteed: the same picture three
    times in a batch gives bit-identical features, on several threads too (a test asserts equal scores)."""
    picture = torch.rand(1, 40, 56, 3)
    batch = torch.cat([picture, torch.rand(1, 40, 56, 3), picture, picture])
    for threads in (1, 2):
        with torch_threads(threads):
            features = encoder.encode_image(batch)
        for index in (2, 3):
            assert torch.equal(features.cls_embedding[index], features.cls_embedding[0]), threads
            assert torch.equal(features.patch_features[index], features.patch_features[0]), threads


def count_image_forwards(encoder) -> list:
    """A list that grows by one entry per image forward of ``encoder`` (its patch embedding runs); remove the hook
    with ``forwards.hook.remove()``."""
    forwards = _Forwards()
    forwards.hook = encoder.model.visual.conv1.register_forward_hook(lambda *_: forwards.append(1))
    return forwards


class _Forwards(list):
    hook = None


def test_cached_image_features_are_reused_only_for_the_same_pixels(encoder):
    images = torch.rand(2, 40, 56, 3)
    forwards = count_image_forwards(encoder)
    try:
        first = encoder.encode_image(images, cached=True)
        again = encoder.encode_image(images.clone(), cached=True)  # another tensor, the same pixels
        assert len(forwards) == 1
        torch.testing.assert_close(again.patch_features, first.patch_features, rtol=0, atol=0)
        torch.testing.assert_close(first.cls_embedding, encoder.encode_image(images).cls_embedding, rtol=0, atol=0)
        assert len(forwards) == 2  # cached=False always runs the forward
        images[1, 3, 5, 0] += 1e-3  # one value changed in place
        changed = encoder.encode_image(images, cached=True)
        assert len(forwards) == 3
        assert not torch.equal(changed.patch_features[1], first.patch_features[1])
        encoder.encode_image(images, use_surgery=False, cached=True)  # the plain patch tokens are other features
        assert len(forwards) == 4
    finally:
        forwards.hook.remove()


def test_the_text_feature_cache_is_bounded(encoder, monkeypatch):
    monkeypatch.setattr(clip_surgery, "TEXT_CACHE_SIZE", 2)
    small = SurgeryCLIP(encoder.model, encoder.architecture, tokenizer=encoder.tokenizer)
    text_forwards = []
    hook = encoder.model.token_embedding.register_forward_hook(lambda module, inputs, output: text_forwards.append(
        inputs[0].shape[0]))
    try:
        first = small.encode_text(["a cat", "a dog"])
        small.encode_text(["a hat"])  # the cache holds two texts: "a cat" is dropped, the oldest
        again = small.encode_text(["a dog", "a hat", "a cat"])  # one text forward, for "a cat" alone
    finally:
        hook.remove()
    assert text_forwards == [2, 1, 1]
    torch.testing.assert_close(again[[2, 0]], first, rtol=0, atol=1e-6)
    assert len(small._text_cache) == 2


def test_lru_cache_drops_the_least_recently_used_entry():
    cache = clip_surgery.LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
    with pytest.raises(ValueError, match="capacity >= 1"):
        clip_surgery.LruCache(0)
