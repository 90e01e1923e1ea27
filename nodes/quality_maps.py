"""G-Refine quality-map nodes: load the quality CLIP and prompts, PQ-Map, AQ-Map, refine mask (thin V3 adapters)."""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io, ui

import comfy.model_management
import comfy.utils
import folder_paths

from ..core import aq_map, clip_surgery, masks, open_clip_files, pq_map, quality_maps, visualize
from ..core.quality_maps import Progress, QualityMaps
from .comfy_io import (
    QUALITY_CLIP_FOLDER,
    QUALITY_PROMPTS_FOLDER,
    check_images,
    check_mask,
    list_weight_files,
    match_batches,
    on_compute_device,
    paths_fingerprint,
    resolve_model_file,
)

QualityClip = io.Custom("REFINERY_QUALITY_CLIP")
QualityPrompts = io.Custom("REFINERY_QUALITY_PROMPTS")

TEXT_PROMPTS_CHOICE = "text prompts (any tower)"
QREFINE_FOLDER_SUFFIX = " (Q-Refine folder)"
IMAGES_PER_FORWARD = 8
CATEGORY = "Refinery/quality maps"


def _prompt_choices() -> list[str]:
    """Text prompts, Refinery prompt files, and folders holding the official Q-Refine PQ-<factor>.pth files."""
    files = list_weight_files(QUALITY_PROMPTS_FOLDER)
    overall = pq_map.qrefine_file_name("overall")
    folders = sorted({os.path.dirname(name) or "." for name in files if os.path.basename(name) == overall})
    singles = [name for name in files if name.endswith(".safetensors")]
    return [TEXT_PROMPTS_CHOICE] + [folder + QREFINE_FOLDER_SUFFIX for folder in folders] + singles


def _qrefine_overall(choice: str) -> str:
    """'<folder> (Q-Refine folder)' -> '<folder>/PQ-overall.pth', the file that locates the folder."""
    return os.path.join(choice[: -len(QREFINE_FOLDER_SUFFIX)], pq_map.qrefine_file_name("overall"))


class QualityModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefineryQualityModelLoader",
            display_name="Load Quality CLIP (Refinery)",
            category=CATEGORY,
            description="Loads an open_clip ViT from models/quality_clip/ as a CLIP-Surgery quality model for the "
            "PQ-Map and AQ-Map nodes. Nothing is downloaded.",
            inputs=[
                io.Combo.Input(
                    "checkpoint",
                    options=list_weight_files(QUALITY_CLIP_FOLDER),
                    tooltip="An open_clip checkpoint (.safetensors preferred; .pt/.pth/.bin state dicts are read "
                    "with weights_only) in models/quality_clip/.",
                ),
                io.Combo.Input(
                    "architecture",
                    options=[open_clip_files.AUTO_ARCHITECTURE] + clip_surgery.list_architectures(),
                    default=open_clip_files.AUTO_ARCHITECTURE,
                    tooltip="The open_clip architecture of the checkpoint. 'auto' reads <checkpoint name>.json (an "
                    "open_clip model config) beside it. OpenAI ViT-B/16 weights: ViT-B-16-quickgelu.",
                ),
                io.Int.Input(
                    "surgery_depth",
                    default=0,
                    min=0,
                    max=64,
                    tooltip="How many final blocks get the CLIP-Surgery v-v path. 0 = the last 6, as the reference "
                    "code (all blocks of a tower of 6 or fewer). More blocks give smoother, more object-centred maps.",
                ),
            ],
            outputs=[QualityClip.Output("quality_clip")],
        )

    @classmethod
    def fingerprint_inputs(cls, checkpoint: str, architecture: str, surgery_depth: int):
        """Every file the load reads (weights, shards, the configs beside them), so replacing any reloads."""
        path = folder_paths.get_full_path(QUALITY_CLIP_FOLDER, checkpoint)
        return (checkpoint, *paths_fingerprint(open_clip_files.checkpoint_files(path) if path else []))

    @classmethod
    def execute(cls, checkpoint: str, architecture: str, surgery_depth: int) -> io.NodeOutput:
        path = resolve_model_file(QUALITY_CLIP_FOLDER, checkpoint)
        encoder = clip_surgery.load_quality_clip(path, architecture, surgery_depth=surgery_depth or None)
        return io.NodeOutput(encoder)


class QualityPromptsLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefineryQualityPromptsLoader",
            display_name="Load Quality Prompts (Refinery)",
            category=CATEGORY,
            description="Loads the four learned (positive, negative) quality prompt pairs of the PQ-Map from "
            "models/quality_prompts/: a Refinery .safetensors, a folder with the official Q-Refine PQ-*.pth files "
            "(ViT-B/16 towers only), or plain-text pairs that work with any tower.",
            inputs=[
                io.Combo.Input(
                    "prompts",
                    options=_prompt_choices(),
                    default=TEXT_PROMPTS_CHOICE,
                    tooltip="Learned embeddings must match the quality CLIP's text width (512 for ViT-B/16).",
                )
            ],
            outputs=[QualityPrompts.Output("quality_prompts")],
        )

    @classmethod
    def fingerprint_inputs(cls, prompts: str):
        """Every file the load reads (all four PQ-<factor>.pth of a Q-Refine folder), so replacing any reloads."""
        if prompts == TEXT_PROMPTS_CHOICE:
            return prompts
        if prompts.endswith(QREFINE_FOLDER_SUFFIX):
            overall = folder_paths.get_full_path(QUALITY_PROMPTS_FOLDER, _qrefine_overall(prompts))
            return (prompts, *paths_fingerprint(pq_map.qrefine_files(os.path.dirname(overall)) if overall else []))
        return (prompts, *paths_fingerprint([folder_paths.get_full_path(QUALITY_PROMPTS_FOLDER, prompts) or prompts]))

    @classmethod
    def execute(cls, prompts: str) -> io.NodeOutput:
        if prompts == TEXT_PROMPTS_CHOICE:
            return io.NodeOutput(pq_map.text_quality_prompts())
        if prompts.endswith(QREFINE_FOLDER_SUFFIX):
            overall = resolve_model_file(QUALITY_PROMPTS_FOLDER, _qrefine_overall(prompts))
            return io.NodeOutput(pq_map.load_qrefine_embeddings(os.path.dirname(overall)))
        return io.NodeOutput(pq_map.load_prompt_embeddings(resolve_model_file(QUALITY_PROMPTS_FOLDER, prompts)))


def compute_quality_maps(quality_clip, images: torch.Tensor, *, progress: bool = True, **settings) -> QualityMaps:
    """:func:`..core.quality_maps.compute_quality_maps` (``settings``: its knobs) on ComfyUI's compute device, in
    chunks of :data:`IMAGES_PER_FORWARD` images, sharing each chunk's image forward with the other map nodes on the
    same pixels and model. progress: advance a ProgressBar per chunk (False for a node that has its own bar;
    interrupts are honoured between chunks either way)."""
    with on_compute_device(quality_clip) as encoder:
        return quality_maps.compute_quality_maps(encoder, images, chunk_size=IMAGES_PER_FORWARD, reuse_features=True,
                                                 progress=_chunk_progress(images.shape[0], progress), **settings)


def _chunk_progress(total: int, show: bool) -> Progress:
    """The core's per-chunk progress callback: moves a ComfyUI ProgressBar of ``total`` images (when ``show``) to
    the images done, then raises on a pending interrupt."""
    bar = comfy.utils.ProgressBar(total) if show else None

    def progress(done: int, batch: int) -> None:
        if bar is not None and done:
            bar.update_absolute(done, batch)
        comfy.model_management.throw_exception_if_processing_interrupted()

    return progress


class PerceptualQualityMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefineryPQMap",
            display_name="PQ-Map: Perceptual Quality (Refinery)",
            category=CATEGORY,
            description="G-Refine perceptual quality map: P (1 = good quality) per pixel and score p per image, from "
            "four quality factors combined by the cask effect (a weak factor caps the score). Shows a heat map.",
            inputs=[
                QualityClip.Input("quality_clip", tooltip="The CLIP-Surgery quality model from Load Quality CLIP "
                                  "(one image forward serves both maps of an image)."),
                io.Image.Input("image", tooltip="A batch of any size; any image size and aspect ratio."),
                QualityPrompts.Input(
                    "quality_prompts", optional=True, tooltip="Leave unconnected for the plain-text prompt pairs."
                ),
                io.Float.Input("alpha_technical", default=pq_map.DEFAULT_ALPHA[0], min=0.01, max=1.0, step=0.001,
                               tooltip="Cask bound of the technical factor (blur, noise): scores below it lower p. "
                               "Higher = stricter."),
                io.Float.Input("alpha_rational", default=pq_map.DEFAULT_ALPHA[1], min=0.01, max=1.0, step=0.001,
                               tooltip="Cask bound of the rational factor (broken shapes). Higher = stricter."),
                io.Float.Input("alpha_natural", default=pq_map.DEFAULT_ALPHA[2], min=0.01, max=1.0, step=0.001,
                               tooltip="Cask bound of the natural factor (unnatural colour, texture). Higher = stricter."),
                io.Float.Input("temperature", default=0.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Softmax temperature of the prompt pairs. 0 = the model's own logit scale "
                               "(about 100 for trained CLIP); lower values pull scores towards 0.5."),
            ],
            outputs=[
                io.Mask.Output("perceptual_map", tooltip="P in [0, 1], 1 = good quality."),
                io.Float.Output("perceptual_score", tooltip="p in [0, 1], one per image.", is_output_list=True),
                io.Image.Output("heatmap", tooltip="P over the picture: red = good, blue = poor."),
            ],
        )

    @classmethod
    def execute(cls, quality_clip, image, alpha_technical: float, alpha_rational: float, alpha_natural: float,
                temperature: float, quality_prompts=None) -> io.NodeOutput:
        images = check_images(image)
        maps = compute_quality_maps(quality_clip, images, quality_prompts=quality_prompts,
                                    alpha=(alpha_technical, alpha_rational, alpha_natural), temperature=temperature)
        heatmap = visualize.heatmap_overlay(images, maps.perceptual_map)
        return io.NodeOutput(
            maps.perceptual_map, maps.perceptual_score.tolist(), heatmap, ui=ui.PreviewImage(heatmap, cls=cls)
        )


class AlignmentQualityMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefineryAQMap",
            display_name="AQ-Map: Alignment Defects (Refinery)",
            category=CATEGORY,
            description="G-Refine alignment map: splits the prompt into noun phrases, checks each against the image, "
            "and marks where a missing object or a wrong attribute should be drawn (A, 1 = must change). Also "
            "returns the prompt with the unmatched phrases emphasized, the score a, and a per-phrase report.",
            inputs=[
                QualityClip.Input("quality_clip", tooltip="The CLIP-Surgery quality model from Load Quality CLIP "
                                  "(one image forward serves both maps of an image)."),
                io.Image.Input("image", tooltip="A batch of any size; any image size and aspect ratio. Every image "
                               "is checked against the same prompt."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The generation prompt. ComfyUI emphasis like (red hat:1.3) is understood."),
                io.Float.Input("noun_bound", default=0.5, min=0.01, max=0.99, step=0.01,
                               tooltip="a_bound: a noun whose presence probability is below it counts as missing. "
                               "Higher = flags more objects as missing."),
                io.Float.Input("phrase_bound", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="beta: phrases scoring below it lower the alignment score a. Higher = stricter."),
                io.Float.Input("emphasis", default=1.1, min=1.0, max=2.0, step=0.05,
                               tooltip="Weight given to unmatched phrases appended to the prompt, (phrase:1.1)."),
                io.Float.Input("temperature", default=aq_map.DEFAULT_TEMPERATURE, min=0.1, max=1000.0, step=0.1,
                               optional=True,
                               tooltip="Softmax temperature of the phrase and noun scores (eq. 5). 10 = the official "
                               "AQ script; CLIP's own logit scale (about 100) saturates them to 0 or 1. Lower = scores "
                               "closer to 0.5."),
            ],
            outputs=[
                io.Mask.Output("alignment_map", tooltip="A in [0, 1], 1 = must change."),
                io.Float.Output("alignment_score", tooltip="a, one per image: a probability in [0, 1] (how much "
                                "better the prompt fits than an empty one, times the phrase penalties); 1 when the "
                                "prompt has nothing to align.", is_output_list=True),
                io.String.Output("emphasized_prompt", tooltip="One per image.", is_output_list=True),
                io.String.Output("report", tooltip="Per-image, per-phrase table of scores and defects."),
            ],
        )

    @classmethod
    def execute(cls, quality_clip, image, prompt: str, noun_bound: float, phrase_bound: float,
                emphasis: float, temperature: float = aq_map.DEFAULT_TEMPERATURE) -> io.NodeOutput:
        maps = compute_quality_maps(quality_clip, check_images(image), perceptual=False, prompt=prompt,
                                    noun_bound=noun_bound, phrase_bound=phrase_bound, emphasis=emphasis,
                                    alignment_temperature=temperature)
        report = aq_map.format_report(maps.reports, maps.alignment_score, maps.warnings)
        return io.NodeOutput(maps.alignment_map, maps.alignment_score.tolist(), maps.emphasized_prompts, report,
                             ui={"text": [report]})


class RefineMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RefineryRefineMask",
            display_name="Refine Mask Bi(1-P+A) (Refinery)",
            category=CATEGORY,
            description="G-Refine stage-1 mask: where perceptual quality P is low or alignment defects A are high. "
            "Gives the binary mask (what to re-denoise) and a feathered copy (for blending without seams).",
            inputs=[
                io.Mask.Input("perceptual_map", tooltip="P from the PQ-Map node (1 = good)."),
                io.Mask.Input("alignment_map", tooltip="A from the AQ-Map node (1 = must change)."),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Pixels with 1-P+A above it are refined. Lower = larger mask."),
                io.Int.Input("min_area", default=64, min=0, max=1 << 24,
                             tooltip="Regions smaller than this many pixels are dropped (speckle removal)."),
                io.Int.Input("dilation", default=4, min=0, max=512,
                             tooltip="Grow the mask by this many pixels so fixes blend into their surroundings."),
                io.Float.Input("feather", default=4.0, min=0.0, max=256.0, step=0.5,
                               tooltip="Gaussian sigma (pixels) of the soft edge of the feathered mask."),
            ],
            outputs=[
                io.Mask.Output("binary_mask", tooltip="1 = re-denoise in stage 1."),
                io.Mask.Output("feathered_mask", tooltip="1 on the binary mask, falling off smoothly outside."),
            ],
        )

    @classmethod
    def execute(cls, perceptual_map, alignment_map, threshold: float, min_area: int, dilation: int,
                feather: float) -> io.NodeOutput:
        perceptual = check_mask(perceptual_map, "perceptual_map")
        alignment = check_mask(alignment_map, "alignment_map")
        perceptual, alignment = match_batches(perceptual, alignment, ("perceptual_map", "alignment_map"))
        binary, feathered = masks.refine_mask(perceptual, alignment, threshold, min_area, dilation, feather)
        return io.NodeOutput(binary, feathered, ui=ui.PreviewMask(binary, cls=cls))


NODES = [QualityModelLoader, QualityPromptsLoader, PerceptualQualityMap, AlignmentQualityMap, RefineMask]
