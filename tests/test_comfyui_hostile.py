"""Hostile inputs to the nodes in the real ComfyUI (in-process harness): an 8192 x 8192 picture, a 1000-word prompt,
and a pickle where a safetensors checkpoint is expected. Each gives a result or a clear message, and the next
queued prompt still runs. (The other hostile inputs are listed in tests/README.md.)"""

from __future__ import annotations

import pytest
import torch
from test_comfyui_quality_nodes import add_aq, add_loader, add_pq, good_prompt_still_runs, graph_builder

pytestmark = pytest.mark.comfyui


def test_an_8192_pixel_picture_gets_full_size_maps_and_the_queue_goes_on(comfy_harness):
    graph = graph_builder()
    clip = add_loader(graph)
    image = graph.node("EmptyImage", width=8192, height=8192, batch_size=1, color=0x8080FF)
    pq = add_pq(graph, clip, image)
    aq = add_aq(graph, clip, image, prompt="a red circle")
    refine = graph.node("RefineryRefineMask", perceptual_map=pq.out(0), alignment_map=aq.out(0), threshold=0.5,
                        min_area=0, dilation=0, feather=0.0)
    small = graph.node("ImageScale", image=graph.node("MaskToImage", mask=refine.out(0)).out(0),
                       upscale_method="area", width=64, height=64, crop="disabled")
    graph.node("PreviewImage", images=small.out(0))

    result = comfy_harness.run_graph(graph)

    assert result.success, result.error_text()
    good_prompt_still_runs(comfy_harness, "after_8192")


def test_a_1000_word_prompt_gives_maps_and_a_note_on_the_tower_context_in_the_report(comfy_harness):
    loader = comfy_harness.node_class("RefineryQualityModelLoader")
    encoder = loader.execute(checkpoint="tiny-vit.safetensors", architecture="auto", surgery_depth=0).result[0]
    prompt = " ".join(["a red circle next to a blue square"] * 125)  # 1000 words
    aq = comfy_harness.node_class("RefineryAQMap")
    output = aq.execute(quality_clip=encoder, image=torch.rand(1, 32, 32, 3), prompt=prompt, noun_bound=0.5,
                        phrase_bound=0.5, emphasis=1.1).result
    alignment_map, report = output[0], output[3]
    assert alignment_map.shape == (1, 32, 32)
    assert "prompt has 1002 tokens, the quality CLIP reads 77" in report, report[:500]
    good_prompt_still_runs(comfy_harness, "after_long_prompt")


def test_a_pickle_renamed_to_safetensors_is_refused_without_running_it_then_the_queue_goes_on(comfy_harness):
    marker = comfy_harness.base_dir / "pickle-ran"

    class RunsCode:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = comfy_harness.models_dir / "quality_clip" / "pickled.safetensors"
    torch.save({"state_dict": RunsCode()}, path)
    try:
        graph = graph_builder()
        clip = add_loader(graph, checkpoint="pickled.safetensors")
        graph.node("PreviewImage", images=add_pq(graph, clip, graph.node("EmptyImage", width=32, height=32,
                                                                          batch_size=1, color=0)).out(2))
        result = comfy_harness.run_graph(graph)
    finally:
        path.unlink()
    assert not result.success
    error = result.execution_error
    assert error is not None and error["node_type"] == "RefineryQualityModelLoader", result.error_text()
    assert "pickled.safetensors" in error["exception_message"]
    assert "not a readable safetensors" in error["exception_message"], error["exception_message"]
    assert not marker.exists()
    good_prompt_still_runs(comfy_harness, "after_pickle")
