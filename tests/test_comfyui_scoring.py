"""The scoring nodes inside a real ComfyUI 0.8 (in-process, CPU), on tiny random rewards saved in their real layouts
in models/reward_models/: graphs run, scores equal the core reward's, ranking returns the input pixels best-first,
win rates equal the Syn-Pic formula, and bad inputs fail clearly without breaking the next prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_harness import GraphResult
from tiny_models import TINY_VIT_CONFIG, build_tiny_vit

pytestmark = pytest.mark.comfyui

PICTURES = ("score_a.png", "score_b.png", "score_c.png", "score_d.png")
PROMPT = "a red circle next to a blue square"


@pytest.fixture(scope="module")
def rewards(comfy_harness) -> dict[str, str]:
    """models/reward_models/: a CLIPScore tower (config JSON beside it), a trained reward (reward-clip/1), a linear
    aesthetic head, random bytes; input/: four 64x64 pictures."""
    import open_clip
    from safetensors.torch import save_file

    from comfyui_refinery.core.rewards import save_trained_reward

    folder = comfy_harness.models_dir / "reward_models"
    build_tiny_vit(folder, "reward-tower", TINY_VIT_CONFIG, seed=3)
    torch.manual_seed(4)
    model = open_clip.create_model("reward-tower", pretrained=None)
    save_trained_reward(model, TINY_VIT_CONFIG, folder / "trained-reward.safetensors", "", {"steps": 0})
    torch.manual_seed(5)
    save_file({"weight": torch.randn(1, TINY_VIT_CONFIG["embed_dim"]), "bias": torch.zeros(1)},
              str(folder / "aesthetic-linear.safetensors"))
    (folder / "broken.safetensors").write_bytes(bytes(range(256)) * 8)
    rng = np.random.default_rng(0)
    for index, name in enumerate(PICTURES):
        pixels = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((64, 64), Image.BILINEAR).save(comfy_harness.input_dir / name)
    return {"clip": "reward-tower.safetensors", "trained": "trained-reward.safetensors",
            "aesthetic": "aesthetic-linear.safetensors", "broken": "broken.safetensors"}


def pictures_tensor(harness) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(Image.open(harness.input_dir / name).convert("RGB")).copy())
                        for name in PICTURES]).float() / 255.0


def graph_builder():
    from comfy_execution.graph_utils import GraphBuilder

    return GraphBuilder(prefix="")


def add_batch(graph):
    image = graph.node("LoadImage", image=PICTURES[0])
    for name in PICTURES[1:]:
        image = graph.node("ImageBatch", image1=image.out(0), image2=graph.node("LoadImage", image=name).out(0))
    return image


def add_reward(graph, model, kind="auto", architecture="auto", tower="none"):
    return graph.node("RefineryRewardModelLoader", model=model, kind=kind, architecture=architecture, tower=tower,
                      batch_size=3)


def assert_ok(result: GraphResult) -> None:
    assert result.success, result.error_text()


def core_scores(harness, name: str, kind: str, **options) -> torch.Tensor:
    from comfyui_refinery.core.rewards import load_reward_model

    reward = load_reward_model(harness.models_dir / "reward_models" / name, kind, **options)
    return reward.score(pictures_tensor(harness), PROMPT)


def test_scoring_nodes_load_and_list_the_reward_folder(comfy_harness, rewards):
    import nodes

    assert comfy_harness.pack_import_failures() == []
    spec = nodes.NODE_CLASS_MAPPINGS["RefineryRewardModelLoader"].INPUT_TYPES()["required"]["model"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
    assert set(rewards.values()) <= set(options)
    for node_id in ("RefineryScoreImages", "RefineryRankImages", "RefineryRewardWinRate"):
        schema = nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        assert schema.category == "Refinery/scoring"
        assert not {o.id for o in schema.outputs} & {i.id for i in schema.inputs}


def test_score_images_graph_gives_the_core_scores(comfy_harness, rewards):
    graph = graph_builder()
    reward = add_reward(graph, rewards["clip"], kind="clip-score")
    score = graph.node("RefineryScoreImages", reward=reward.out(0), image=add_batch(graph).out(0), prompt=PROMPT,
                       prompt_per_line=False)
    show = graph.node("PreviewAny", source=score.out(1))
    result = comfy_harness.run_graph(graph)
    assert_ok(result)
    table = result.outputs[show.id]["text"][0]
    expected = core_scores(comfy_harness, rewards["clip"], "clip-score")
    values = [float(line.split("|")[2]) for line in table.splitlines()[2:]]
    assert values == pytest.approx(expected.tolist(), abs=1e-4)
    assert table.splitlines()[0] == "| image | reward-tower | prompt |"


def test_rank_returns_the_input_pixels_best_first(comfy_harness, rewards):
    graph = graph_builder()
    reward = add_reward(graph, rewards["trained"])  # auto: Refinery metadata -> trained
    rank = graph.node("RefineryRankImages", reward=reward.out(0), image=add_batch(graph).out(0), prompt=PROMPT,
                      prompt_per_line=False, k=2)
    save = graph.node("SaveImage", images=rank.out(1), filename_prefix="best")
    indices = graph.node("PreviewAny", source=rank.out(2))
    result = comfy_harness.run_graph(graph)
    assert_ok(result)
    expected = core_scores(comfy_harness, rewards["trained"], "trained")
    order = torch.argsort(expected, descending=True, stable=True).tolist()
    assert result.outputs[indices.id]["text"] == [", ".join(map(str, order))]
    saved = [np.asarray(Image.open(path).convert("RGB")) for path in comfy_harness.output_files(result, save.id)]
    originals = (pictures_tensor(comfy_harness) * 255).round().byte().numpy()
    assert len(saved) == 2 and all(np.array_equal(s, originals[i]) for s, i in zip(saved, order[:2]))


def hand_win_rates(scores: list[list[float]], group: int) -> list[float]:
    """Syn-Pic phi (rankdpo.txt, Algorithm 1) counted one comparison at a time: for image i, a win (1), tie (1/2) or
    loss (0) against each other image of its group of ``group`` consecutive images under each reward, divided by
    n (k - 1). scores: n rewards x B images."""
    win_rates = []
    for i in range(len(scores[0])):
        start = i - i % group
        points = sum(1.0 if row[i] > row[j] else 0.5 if row[i] == row[j] else 0.0
                     for row in scores for j in range(start, start + group) if j != i)
        win_rates.append(points / (len(scores) * (group - 1)))
    return win_rates


@pytest.mark.parametrize("images_per_prompt, group", [(2, 2), (0, 4)])  # 0: the whole batch is one prompt's
def test_win_rate_over_two_rewards_matches_syn_pic(comfy_harness, rewards, images_per_prompt, group):
    node = comfy_harness.node_class("RefineryRewardWinRate")
    loader = comfy_harness.node_class("RefineryRewardModelLoader")
    clip = loader.execute(model=rewards["clip"], kind="clip-score", architecture="auto", tower="none",
                          batch_size=2).result[0]
    trained = loader.execute(model=rewards["trained"], kind="auto", architecture="auto", tower="none",
                             batch_size=4).result[0]
    images = pictures_tensor(comfy_harness)
    lines = ["a", "b", "c", "d"]
    with torch.inference_mode():
        out = node.execute(reward_1=clip, image=images, prompt="\n".join(lines), prompt_per_line=True,
                           images_per_prompt=images_per_prompt, reward_2=trained).result
        scores = [clip.score(images, lines).tolist(), trained.score(images, lines).tolist()]
    expected = hand_win_rates(scores, group)
    assert len(set(expected)) > 1, "the two tiny rewards should not tie every image"
    assert out[0] == pytest.approx(expected)
    assert out[1].shape == (4 // group, 64, 64, 3)
    for index, start in enumerate(range(0, 4, group)):
        best = max(range(start, start + group), key=lambda i: (expected[i], -i))  # a tie keeps the first
        assert torch.equal(out[1][index], images[best])


def test_aesthetic_head_needs_its_tower(comfy_harness, rewards):
    graph = graph_builder()
    reward = add_reward(graph, rewards["aesthetic"])
    score = graph.node("RefineryScoreImages", reward=reward.out(0), image=add_batch(graph).out(0), prompt="",
                       prompt_per_line=False)
    graph.node("PreviewAny", source=score.out(1))
    failed = comfy_harness.run_graph(graph)
    assert not failed.success and "choose its CLIP tower in 'tower'" in failed.error_text()

    graph = graph_builder()
    reward = add_reward(graph, rewards["aesthetic"], tower=rewards["clip"])
    score = graph.node("RefineryScoreImages", reward=reward.out(0), image=add_batch(graph).out(0), prompt="",
                       prompt_per_line=False)
    show = graph.node("PreviewAny", source=score.out(1))
    result = comfy_harness.run_graph(graph)
    assert_ok(result)
    assert "aesthetic" in result.outputs[show.id]["text"][0]


@pytest.mark.parametrize("case, message", [
    ("lines", "'prompt' has 2 non-empty lines for a batch of 4 images"),
    ("k", "k is 5 but the batch holds 4 images"),
    ("broken", "broken.safetensors"),
    ("group", "images_per_prompt is 3 for a batch of 4"),
])
def test_bad_inputs_fail_clearly_and_the_queue_goes_on(comfy_harness, rewards, case, message):
    graph = graph_builder()
    reward = add_reward(graph, rewards["broken"] if case == "broken" else rewards["clip"],
                        kind="clip-score" if case != "broken" else "auto")
    image = add_batch(graph)
    if case == "group":
        node = graph.node("RefineryRewardWinRate", reward_1=reward.out(0), image=image.out(0), prompt=PROMPT,
                          prompt_per_line=False, images_per_prompt=3)
        graph.node("PreviewAny", source=node.out(2))
    else:
        node = graph.node("RefineryRankImages", reward=reward.out(0), image=image.out(0),
                          prompt="one\ntwo" if case == "lines" else PROMPT, prompt_per_line=case == "lines",
                          k=5 if case == "k" else 1)
        graph.node("PreviewAny", source=node.out(3))
    result = comfy_harness.run_graph(graph)
    assert not result.success
    assert message in result.error_text()

    good = graph_builder()
    score = good.node("RefineryScoreImages", reward=add_reward(good, rewards["clip"], kind="clip-score").out(0),
                      image=add_batch(good).out(0), prompt=f"{PROMPT} {case}", prompt_per_line=False)
    good.node("PreviewAny", source=score.out(1))
    assert_ok(comfy_harness.run_graph(good))


def test_architecture_is_a_list_of_open_clip_names_with_auto(comfy_harness, rewards):
    """A combo (the loader's errors say "choose ... from the list"), default auto = the format's default or the JSON
    beside the file; "" (the text box of earlier versions, in saved workflows) still means auto."""
    import open_clip

    spec = comfy_harness.node_class("RefineryRewardModelLoader").INPUT_TYPES()["required"]["architecture"]
    assert spec[0] == "COMBO" and spec[1]["default"] == "auto"
    assert spec[1]["options"][0] == "auto" and set(open_clip.list_models()) <= set(spec[1]["options"])
    assert {"ViT-H-14", "ViT-L-14-quickgelu", "reward-tower"} <= set(spec[1]["options"])
    expected = core_scores(comfy_harness, rewards["clip"], "clip-score")
    for architecture in ("auto", "", "reward-tower"):
        graph = graph_builder()
        reward = add_reward(graph, rewards["clip"], kind="clip-score", architecture=architecture)
        score = graph.node("RefineryScoreImages", reward=reward.out(0), image=add_batch(graph).out(0), prompt=PROMPT,
                           prompt_per_line=False)
        show = graph.node("PreviewAny", source=score.out(1))
        result = comfy_harness.run_graph(graph)
        assert_ok(result)
        values = [float(line.split("|")[2]) for line in result.outputs[show.id]["text"][0].splitlines()[2:]]
        assert values == pytest.approx(expected.tolist(), abs=1e-4), architecture

    graph = graph_builder()
    reward = add_reward(graph, rewards["clip"], kind="clip-score", architecture="ViT-Nope")
    score = graph.node("RefineryScoreImages", reward=reward.out(0), image=add_batch(graph).out(0), prompt=PROMPT,
                       prompt_per_line=False)
    graph.node("PreviewAny", source=score.out(1))
    refused = comfy_harness.run_graph(graph)
    assert refused.validation_error is not None
    text = refused.error_text()
    assert "Unknown open_clip architecture 'ViT-Nope'" in text and "from the list" in text


def test_replacing_the_config_beside_a_reward_reloads_it(comfy_harness, rewards):
    import os

    loader = comfy_harness.node_class("RefineryRewardModelLoader")
    arguments = dict(model=rewards["clip"], kind="clip-score", architecture="auto", tower="none", batch_size=3)
    before = loader.fingerprint_inputs(**arguments)
    config = comfy_harness.models_dir / "reward_models" / "reward-tower.json"
    status = config.stat()
    os.utime(config, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    assert loader.fingerprint_inputs(**arguments) != before
