"""The quality-map nodes inside a real ComfyUI 0.8 (in-process, CPU): schemas, real API-format graphs from LoadImage
to SaveImage, batches, and bad inputs that must fail with a clear message without breaking the next prompt.

Models are tiny random open_clip ViTs (conftest.py), so the checks are about wiring, shapes and messages, not
about what the maps mean (the core tests cover the maths)."""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_harness import REFINERY_NODE_IDS, GraphResult

pytestmark = pytest.mark.comfyui

PICTURE_SIZE = (64, 48)  # PIL (width, height) of input/picture.png
PROMPT = "a red circle next to a blue square"
_RECOVERY_RUNS = itertools.count(1)


def graph_builder():
    from comfy_execution.graph_utils import GraphBuilder

    return GraphBuilder(prefix="")


def add_loader(graph, checkpoint="tiny-vit.safetensors", architecture="auto", surgery_depth=0):
    return graph.node("RefineryQualityModelLoader", checkpoint=checkpoint, architecture=architecture,
                      surgery_depth=surgery_depth)


def add_image(graph, name="picture.png", batch=1):
    image = graph.node("LoadImage", image=name)
    if batch > 1:
        return graph.node("RepeatImageBatch", image=image.out(0), amount=batch)
    return image


def add_pq(graph, clip, image, prompts=None, **widgets):
    values = dict(alpha_technical=0.5, alpha_rational=0.5, alpha_natural=0.5, temperature=0.0) | widgets
    if prompts is not None:
        values["quality_prompts"] = prompts.out(0)
    return graph.node("RefineryPQMap", quality_clip=clip.out(0), image=image.out(0), **values)


def add_aq(graph, clip, image, prompt=PROMPT, **widgets):
    values = dict(noun_bound=0.5, phrase_bound=0.5, emphasis=1.1) | widgets
    return graph.node("RefineryAQMap", quality_clip=clip.out(0), image=image.out(0), prompt=prompt, **values)


def save_mask(graph, mask_link, prefix):
    as_image = graph.node("MaskToImage", mask=mask_link)
    return graph.node("SaveImage", images=as_image.out(0), filename_prefix=prefix)


def assert_ok(result: GraphResult) -> None:
    assert result.success, f"graph failed:\n{result.error_text()}"


def saved_sizes(harness, result, node) -> list[tuple[int, int]]:
    files = harness.output_files(result, node.id)
    assert files, f"node {node.id} reported no files: {result.outputs.get(node.id)}"
    sizes = []
    for path in files:
        assert path.is_file(), path
        with Image.open(path) as picture:
            sizes.append(picture.size)
    return sizes


def preview_values(result, node) -> list[str]:
    return list(result.outputs[node.id]["text"])


def good_prompt_still_runs(harness, prefix) -> None:
    """The executor recovers after a failure: a valid PQ + AQ graph runs fully afterwards."""
    step = next(_RECOVERY_RUNS)  # new widget values, so the quality nodes really run again (not from the cache)
    graph = graph_builder()
    clip, image = add_loader(graph), add_image(graph)
    pq = add_pq(graph, clip, image, alpha_technical=0.5 + 0.001 * step)
    aq = add_aq(graph, clip, image, noun_bound=0.5 + 0.001 * step)
    save = graph.node("SaveImage", images=pq.out(2), filename_prefix=prefix)
    aq_save = save_mask(graph, aq.out(0), prefix + "_aq")
    result = harness.run_graph(graph)
    assert_ok(result)
    assert result.did_run(pq.id) and result.did_run(aq.id)
    assert saved_sizes(harness, result, save) == [PICTURE_SIZE]
    assert saved_sizes(harness, result, aq_save) == [PICTURE_SIZE]


# -- loading and schemas ---------------------------------------------------------------------------------------
def test_pack_loads_and_every_schema_builds(comfy_harness):
    import nodes

    assert comfy_harness.pack_import_failures() == []
    ours = {
        name: cls
        for name, cls in nodes.NODE_CLASS_MAPPINGS.items()
        if getattr(cls, "RELATIVE_PYTHON_MODULE", "") == f"custom_nodes.{Path(comfy_harness.pack_module_path).name}"
    }
    assert set(REFINERY_NODE_IDS) <= set(nodes.NODE_CLASS_MAPPINGS)
    assert set(ours) == set(REFINERY_NODE_IDS), sorted(ours)
    for name, cls in ours.items():
        schema = cls.GET_SCHEMA()
        assert schema.node_id == name and name.startswith("Refinery")
        assert schema.category.startswith("Refinery/"), schema.category
        assert name in nodes.NODE_DISPLAY_NAME_MAPPINGS
        info = cls.INPUT_TYPES()  # what validation and /object_info use
        assert "required" in info
    loader_inputs = nodes.NODE_CLASS_MAPPINGS["RefineryQualityModelLoader"].INPUT_TYPES()["required"]
    checkpoint_options = loader_inputs["checkpoint"][1]["options"]
    assert {"tiny-vit.safetensors", "other-vit.safetensors", "broken.safetensors"} <= set(checkpoint_options)
    assert {"auto", "ViT-B-16"} <= set(loader_inputs["architecture"][1]["options"])


# -- PQ-Map ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("connect_prompts", [False, True], ids=["default-prompts", "prompts-loader"])
def test_pq_map_graph_saves_heatmap_and_map_at_input_size(comfy_harness, connect_prompts):
    graph = graph_builder()
    clip, image = add_loader(graph), add_image(graph)
    prompts = graph.node("RefineryQualityPromptsLoader", prompts="text prompts (any tower)") if connect_prompts else None
    pq = add_pq(graph, clip, image, prompts)
    heat_save = graph.node("SaveImage", images=pq.out(2), filename_prefix=f"pq_heat_{connect_prompts}")
    graph.node("PreviewImage", images=pq.out(2))
    map_save = save_mask(graph, pq.out(0), f"pq_map_{connect_prompts}")
    score = graph.node("PreviewAny", source=pq.out(1))

    result = comfy_harness.run_graph(graph)

    assert_ok(result)
    assert saved_sizes(comfy_harness, result, heat_save) == [PICTURE_SIZE]
    assert saved_sizes(comfy_harness, result, map_save) == [PICTURE_SIZE]
    assert comfy_harness.output_files(result, pq.id), "the PQ-Map node shows its heat map"
    assert all(path.is_file() for path in comfy_harness.output_files(result, pq.id))
    (value,) = preview_values(result, score)
    assert 0.0 <= float(value) <= 1.0
    if connect_prompts:
        assert result.did_run(prompts.id)


# -- AQ-Map ----------------------------------------------------------------------------------------------------
def test_aq_map_graph_saves_mask_and_shows_report(comfy_harness):
    graph = graph_builder()
    clip, image = add_loader(graph), add_image(graph)
    aq = add_aq(graph, clip, image)
    save = save_mask(graph, aq.out(0), "aq_map")
    emphasized = graph.node("PreviewAny", source=aq.out(2))
    report_preview = graph.node("PreviewAny", source=aq.out(3))

    result = comfy_harness.run_graph(graph)

    assert_ok(result)
    assert saved_sizes(comfy_harness, result, save) == [PICTURE_SIZE]
    (report,) = result.outputs[aq.id]["text"]
    assert "image 0: alignment score a =" in report
    assert "circle" in report and "square" in report
    assert preview_values(result, report_preview) == [report]
    (prompt,) = preview_values(result, emphasized)
    assert "red circle" in prompt and "blue square" in prompt


# -- RefineMask, and every input wired ---------------------------------------------------------------------------
def test_refine_mask_from_both_maps_with_every_input_wired(comfy_harness):
    graph = graph_builder()
    clip = add_loader(graph, surgery_depth=3)
    image = add_image(graph)
    prompts = graph.node("RefineryQualityPromptsLoader", prompts="text prompts (any tower)")
    pq = add_pq(graph, clip, image, prompts, alpha_technical=0.4, alpha_rational=0.6, alpha_natural=0.3,
                temperature=50.0)
    aq = add_aq(graph, clip, image, noun_bound=0.6, phrase_bound=0.4, emphasis=1.3)
    refine = graph.node("RefineryRefineMask", perceptual_map=pq.out(0), alignment_map=aq.out(0), threshold=0.3,
                        min_area=4, dilation=2, feather=1.5)
    binary_save = save_mask(graph, refine.out(0), "refine_binary")
    feathered_save = save_mask(graph, refine.out(1), "refine_feathered")

    result = comfy_harness.run_graph(graph)

    assert_ok(result)
    assert all(result.did_run(node.id) for node in (clip, pq, aq, refine))
    assert result.did_run(prompts.id) or prompts.id in result.events("execution_cached")[0]["nodes"]
    assert saved_sizes(comfy_harness, result, binary_save) == [PICTURE_SIZE]
    assert saved_sizes(comfy_harness, result, feathered_save) == [PICTURE_SIZE]
    with Image.open(comfy_harness.output_files(result, binary_save.id)[0]) as picture:
        assert set(picture.convert("L").histogram()[1:255]) == {0}, "the binary mask is binary"
    assert comfy_harness.output_files(result, refine.id), "the node previews its mask"


def test_batch_of_three_gives_three_maps_and_scores(comfy_harness):
    graph = graph_builder()
    clip, image = add_loader(graph), add_image(graph, batch=3)
    pq, aq = add_pq(graph, clip, image), add_aq(graph, clip, image)
    refine = graph.node("RefineryRefineMask", perceptual_map=pq.out(0), alignment_map=aq.out(0), threshold=0.5,
                        min_area=0, dilation=0, feather=0.0)
    pq_save, aq_save = save_mask(graph, pq.out(0), "batch_pq"), save_mask(graph, aq.out(0), "batch_aq")
    refine_save = save_mask(graph, refine.out(0), "batch_refine")
    pq_scores, aq_scores = graph.node("PreviewAny", source=pq.out(1)), graph.node("PreviewAny", source=aq.out(1))
    prompts = graph.node("PreviewAny", source=aq.out(2))

    result = comfy_harness.run_graph(graph)

    assert_ok(result)
    for save in (pq_save, aq_save, refine_save):
        assert saved_sizes(comfy_harness, result, save) == [PICTURE_SIZE] * 3
    assert len(preview_values(result, pq_scores)) == 3
    assert len(preview_values(result, aq_scores)) == 3
    assert len(preview_values(result, prompts)) == 3
    report = result.outputs[aq.id]["text"][0]
    assert all(f"image {index}:" in report for index in range(3))
    # the same picture three times gives the same score three times
    assert len(set(preview_values(result, pq_scores))) == 1


def test_pq_and_aq_nodes_on_one_picture_share_one_image_forward(comfy_harness):
    """ARCHITECTURE.md: one image forward of the quality model serves every map. The PQ-Map and AQ-Map nodes run
    separately, so they share it through the encoder's image-feature cache; counted here as the quality CLIP's patch
    embeddings (its only 3-channel convolution) while a graph with both nodes on a new picture runs."""
    pixels = np.random.default_rng(next(_RECOVERY_RUNS)).integers(0, 256, (PICTURE_SIZE[1], PICTURE_SIZE[0], 3))
    name = f"shared-forward-{os.getpid()}-{next(_RECOVERY_RUNS)}.png"  # pixels no earlier run has encoded
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(comfy_harness.input_dir / name)
    graph = graph_builder()
    clip, image = add_loader(graph), add_image(graph, name)
    pq, aq = add_pq(graph, clip, image), add_aq(graph, clip, image)
    saves = [save_mask(graph, pq.out(0), "shared_pq"), save_mask(graph, aq.out(0), "shared_aq")]
    image_forwards = []

    def count_image_forwards(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3:
            image_forwards.append(tuple(inputs[0].shape))

    hook = torch.nn.modules.module.register_module_forward_hook(count_image_forwards)
    try:
        result = comfy_harness.run_graph(graph)
    finally:
        hook.remove()

    assert_ok(result)
    assert result.did_run(pq.id) and result.did_run(aq.id)
    assert all(saved_sizes(comfy_harness, result, save) == [PICTURE_SIZE] for save in saves)
    assert len(image_forwards) == 1, f"image forwards of the quality CLIP: {image_forwards}"


def test_one_pixel_image_gives_one_pixel_maps(comfy_harness):
    graph = graph_builder()
    clip, image = add_loader(graph), add_image(graph, "dot.png")
    pq, aq = add_pq(graph, clip, image), add_aq(graph, clip, image)
    refine = graph.node("RefineryRefineMask", perceptual_map=pq.out(0), alignment_map=aq.out(0), threshold=0.5,
                        min_area=64, dilation=4, feather=4.0)
    saves = [save_mask(graph, pq.out(0), "dot_pq"), save_mask(graph, aq.out(0), "dot_aq"),
             save_mask(graph, refine.out(1), "dot_refine"), graph.node("SaveImage", images=pq.out(2),
                                                                         filename_prefix="dot_heat")]
    result = comfy_harness.run_graph(graph)
    assert_ok(result)
    for save in saves:
        assert saved_sizes(comfy_harness, result, save) == [(1, 1)]


@pytest.mark.parametrize(
    ("prompt", "note"),
    [("", "empty prompt"), ("   ", "empty prompt"), ("very quickly and beautifully", "no noun")],
    ids=["empty", "blank", "no-noun"],
)
def test_aq_map_without_nouns_is_neutral_and_says_so(comfy_harness, prompt, note):
    graph = graph_builder()
    clip, image = add_loader(graph), add_image(graph)
    aq = add_aq(graph, clip, image, prompt=prompt)
    save = save_mask(graph, aq.out(0), "aq_neutral")
    score = graph.node("PreviewAny", source=aq.out(1))

    result = comfy_harness.run_graph(graph)

    assert_ok(result)
    report = result.outputs[aq.id]["text"][0]
    assert note in report, report
    with Image.open(comfy_harness.output_files(result, save.id)[0]) as picture:
        assert picture.size == PICTURE_SIZE
        assert picture.convert("L").getextrema() == (0, 0), "A = 0: nothing to change"
    (value,) = preview_values(result, score)
    if note == "empty prompt":
        assert float(value) == 1.0


# -- bad inputs --------------------------------------------------------------------------------------------------
def test_missing_checkpoint_is_a_validation_error(comfy_harness):
    graph = graph_builder()
    clip, image = add_loader(graph, checkpoint="no-such-model.safetensors"), add_image(graph)
    graph.node("SaveImage", images=add_pq(graph, clip, image).out(2), filename_prefix="missing")

    result = comfy_harness.run_graph(graph)

    assert not result.success
    assert result.validation_error is not None
    assert clip.id in result.node_errors
    text = result.error_text()
    assert "no-such-model.safetensors" in text and "checkpoint" in text and "not in list" in text.lower()
    good_prompt_still_runs(comfy_harness, "after_missing")


@pytest.mark.parametrize(
    ("checkpoint", "architecture", "keywords"),
    [
        ("broken.safetensors", "auto", ["broken.safetensors", "not a readable safetensors", "corrupt"]),
        ("other-vit.safetensors", "auto", ["other-vit.safetensors", "does not match architecture 'other-vit'",
                                           "of another shape"]),
        ("tiny-vit.safetensors", "ViT-B-16", ["tiny-vit.safetensors", "does not match architecture 'ViT-B-16'"]),
    ],
    ids=["corrupt", "auto-config-mismatch", "wrong-architecture"],
)
def test_bad_checkpoint_fails_with_a_clear_error_then_recovers(comfy_harness, checkpoint, architecture, keywords):
    graph = graph_builder()
    clip, image = add_loader(graph, checkpoint=checkpoint, architecture=architecture), add_image(graph)
    graph.node("SaveImage", images=add_pq(graph, clip, image).out(2), filename_prefix="bad_checkpoint")

    result = comfy_harness.run_graph(graph)

    assert not result.success
    assert result.validation_error is None, result.error_text()
    error = result.execution_error
    assert error is not None and error["node_id"] == clip.id and error["node_type"] == "RefineryQualityModelLoader"
    assert error["exception_type"].endswith("ValueError")
    for keyword in keywords:
        assert keyword in error["exception_message"], error["exception_message"]
    good_prompt_still_runs(comfy_harness, f"after_{checkpoint}_{architecture}")


def test_refine_mask_batch_mismatch_fails_then_recovers(comfy_harness):
    graph = graph_builder()
    clip = add_loader(graph)
    pq = add_pq(graph, clip, add_image(graph, batch=2))
    aq = add_aq(graph, clip, add_image(graph, batch=3))
    refine = graph.node("RefineryRefineMask", perceptual_map=pq.out(0), alignment_map=aq.out(0), threshold=0.5,
                        min_area=0, dilation=0, feather=0.0)
    save_mask(graph, refine.out(0), "mismatch")

    result = comfy_harness.run_graph(graph)

    assert not result.success
    error = result.execution_error
    assert error is not None and error["node_id"] == refine.id, result.error_text()
    message = error["exception_message"]
    assert "perceptual_map" in message and "alignment_map" in message
    assert "batch of 2" in message and "batch of 3" in message and "must match" in message
    good_prompt_still_runs(comfy_harness, "after_mismatch")


def test_nan_pixels_are_refused_with_a_clear_message(comfy_harness):
    """LoadImage cannot give NaN pixels: call the ComfyUI-loaded node classes directly."""
    loader = comfy_harness.node_class("RefineryQualityModelLoader")
    encoder = loader.execute(checkpoint="tiny-vit.safetensors", architecture="auto", surgery_depth=0).result[0]
    images = torch.rand(2, 16, 24, 3)
    images[1, 3, 4, 0] = float("nan")
    pq = comfy_harness.node_class("RefineryPQMap")
    with pytest.raises(ValueError, match=r"'image' contains NaN or infinite pixels \(images \[1\]"):
        pq.execute(quality_clip=encoder, image=images, alpha_technical=0.5, alpha_rational=0.5, alpha_natural=0.5,
                   temperature=0.0)
    aq = comfy_harness.node_class("RefineryAQMap")
    with pytest.raises(ValueError, match="NaN or infinite"):
        aq.execute(quality_clip=encoder, image=images, prompt=PROMPT, noun_bound=0.5, phrase_bound=0.5, emphasis=1.1)
    refine = comfy_harness.node_class("RefineryRefineMask")
    bad_mask = torch.zeros(1, 8, 8)
    bad_mask[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="'alignment_map' contains NaN or infinite"):
        refine.execute(perceptual_map=torch.ones(1, 8, 8), alignment_map=bad_mask, threshold=0.5, min_area=0,
                       dilation=0, feather=0.0)
    good_prompt_still_runs(comfy_harness, "after_nan")


# -- prompts of another tower, progress and interruption ---------------------------------------------------------
def test_qrefine_embeddings_on_a_narrower_tower_fail_clearly_then_recover(comfy_harness):
    from ci import skip_or_fail
    from conftest import QREFINE_FOLDER

    if not QREFINE_FOLDER.is_dir():  # skips on a machine without them; fails under CI, which must run it
        skip_or_fail(f"official Q-Refine embeddings (PQ-*.pth) not found at {QREFINE_FOLDER}")
    graph = graph_builder()
    clip, image = add_loader(graph), add_image(graph)
    prompts = graph.node("RefineryQualityPromptsLoader", prompts="qrefine (Q-Refine folder)")
    graph.node("SaveImage", images=add_pq(graph, clip, image, prompts=prompts).out(2), filename_prefix="qrefine")

    result = comfy_harness.run_graph(graph)

    assert not result.success
    error = result.execution_error
    assert error is not None and error["node_type"] == "RefineryPQMap", result.error_text()
    assert "made for another CLIP" in error["exception_message"] and "(N, 77, 64)" in error["exception_message"]
    good_prompt_still_runs(comfy_harness, "after_qrefine")


class ProgressRecorder:
    """Stands in for the browser end of ComfyUI's progress hook (main.py installs the real one in a server):
    records (value, total, node_id); optionally raises ComfyUI's interrupt flag at the first update."""

    def __init__(self, interrupt: bool = False):
        self.updates: list[tuple[int, int, str]] = []
        self.interrupt = interrupt

    def __call__(self, value, total, preview, node_id=None):
        import comfy.model_management
        from comfy_execution.utils import get_executing_context

        if node_id is None and get_executing_context() is not None:  # as main.py's hook resolves it
            node_id = get_executing_context().node_id
        self.updates.append((value, total, node_id))
        if self.interrupt:
            comfy.model_management.interrupt_current_processing(True)


def run_with_progress_hook(harness, graph, recorder):
    import comfy.utils

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(recorder)
    try:
        return harness.run_graph(graph)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)


def test_map_nodes_report_progress_per_chunk_of_the_batch(comfy_harness):
    graph = graph_builder()
    clip, image = add_loader(graph), add_image(graph, batch=10)
    pq = add_pq(graph, clip, image, alpha_natural=0.77)
    graph.node("SaveImage", images=pq.out(2), filename_prefix="progress")
    recorder = ProgressRecorder()

    result = run_with_progress_hook(comfy_harness, graph, recorder)

    assert_ok(result)
    assert [(value, total) for value, total, node in recorder.updates if node == pq.id] == [(8, 10), (10, 10)]


def test_interrupt_stops_a_map_node_between_chunks_and_the_queue_goes_on(comfy_harness):
    import comfy.model_management

    graph = graph_builder()
    clip, image = add_loader(graph), add_image(graph, batch=20)
    aq = add_aq(graph, clip, image, phrase_bound=0.42)
    save_mask(graph, aq.out(0), "interrupted")
    recorder = ProgressRecorder(interrupt=True)
    try:
        result = run_with_progress_hook(comfy_harness, graph, recorder)
    finally:
        comfy.model_management.interrupt_current_processing(False)

    assert not result.success
    assert result.events("execution_interrupted"), result.messages
    assert [value for value, _, node in recorder.updates if node == aq.id] == [8]  # stopped before chunk 2
    good_prompt_still_runs(comfy_harness, "after_interrupt")


# -- transformers CLIP weights, and loaders that notice replaced files ------------------------------------------------
def test_a_transformers_clip_folder_loads_and_runs_both_maps(comfy_harness):
    """A CLIPModel.save_pretrained folder in models/quality_clip/ shows up as '<folder>/model.safetensors'; 'auto'
    reads the config.json beside it and converts it to the open_clip tower both maps run on."""
    from tiny_models import build_tiny_transformers_clip

    folder = comfy_harness.models_dir / "quality_clip" / "hf-tiny-clip"
    if not (folder / "model.safetensors").is_file():
        build_tiny_transformers_clip(folder)
    checkpoint = "hf-tiny-clip/model.safetensors"
    loader = comfy_harness.node_class("RefineryQualityModelLoader")
    assert checkpoint in loader.INPUT_TYPES()["required"]["checkpoint"][1]["options"]
    graph = graph_builder()
    clip, image = add_loader(graph, checkpoint=checkpoint), add_image(graph)
    pq, aq = add_pq(graph, clip, image), add_aq(graph, clip, image)
    saves = [save_mask(graph, pq.out(0), "hf_pq"), save_mask(graph, aq.out(0), "hf_aq")]
    score = graph.node("PreviewAny", source=pq.out(1))

    result = comfy_harness.run_graph(graph)

    assert_ok(result)
    assert all(saved_sizes(comfy_harness, result, save) == [PICTURE_SIZE] for save in saves)
    assert 0.0 <= float(preview_values(result, score)[0]) <= 1.0

    # replacing the config beside the weights reloads the model (the fingerprint covers every file read)
    arguments = dict(checkpoint=checkpoint, architecture="auto", surgery_depth=0)
    before = loader.fingerprint_inputs(**arguments)
    status = (folder / "config.json").stat()
    os.utime(folder / "config.json", ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    assert loader.fingerprint_inputs(**arguments) != before


def run_pq_with_prompts(harness, choice: str):
    """Load Quality CLIP + Load Quality Prompts(choice) -> PQ-Map with every cask bound 1 (so each factor's score
    moves p) -> score preview. Returns (result, prompts node, score preview node)."""
    graph = graph_builder()
    clip, image = add_loader(graph), add_image(graph)
    prompts = graph.node("RefineryQualityPromptsLoader", prompts=choice)
    pq = add_pq(graph, clip, image, prompts, alpha_technical=1.0, alpha_rational=1.0, alpha_natural=1.0)
    score = graph.node("PreviewAny", source=pq.out(1))
    return harness.run_graph(graph), prompts, score


def test_replacing_any_qrefine_file_reloads_the_prompts_and_a_damaged_one_is_named(comfy_harness, tmp_path):
    """The loader used to fingerprint PQ-overall.pth only: a new PQ-natural.pth gave the old results until a
    restart. A cut file is then refused naming it, and the queue goes on."""
    from tiny_models import write_qrefine_prompts

    folder = write_qrefine_prompts(comfy_harness.models_dir / "quality_prompts" / "refresh-test", width=64, seed=0)
    choice = "refresh-test (Q-Refine folder)"
    first, prompts, score = run_pq_with_prompts(comfy_harness, choice)
    assert_ok(first)
    again, prompts, score_again = run_pq_with_prompts(comfy_harness, choice)
    assert_ok(again)
    assert not again.did_run(prompts.id), "nothing changed: the prompts come from the cache"

    replacement = write_qrefine_prompts(tmp_path / "other", width=64, seed=1) / "PQ-natural.pth"
    target = folder / "PQ-natural.pth"
    status = target.stat()
    shutil.copyfile(replacement, target)  # same size, so only the time tells
    os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    changed, prompts, score_changed = run_pq_with_prompts(comfy_harness, choice)

    assert_ok(changed)
    assert changed.did_run(prompts.id)
    assert preview_values(changed, score_changed) != preview_values(first, score)

    target.write_bytes(replacement.read_bytes()[:1000])  # a copy cut short
    damaged, prompts, _ = run_pq_with_prompts(comfy_harness, choice)
    assert not damaged.success
    error = damaged.execution_error
    assert error is not None and error["node_id"] == prompts.id, damaged.error_text()
    assert str(target) in error["exception_message"] and "cut short" in error["exception_message"]
    good_prompt_still_runs(comfy_harness, "after_damaged_prompts")
