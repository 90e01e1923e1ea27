"""G-Refine alignment quality map (AQ-Map): g-refine.txt eq. 4-8 and Algorithm 1, METHODS.md 1.3.

Map convention: A is a *defect* map in [0, 1], 1 = must change, 0 where the prompt is satisfied. The paper
writes eq. 6 multiplicatively over an initial A = 1 ("where to act"); our A is the union (max) of the selected
phrase regions, which is the same selection read as "where it is wrong". The printed eq. 6 has its two cases
swapped; we follow the text (METHODS.md 1.3):
- noun unmatched (``a_pns[j] < a_bound``): the object is missing, draw the phrase on its ancestor's noun region;
- adjective unmatched (``a_phs[j] < a_pns[j]``, noun present): draw it on its own noun's region.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from .clip_surgery import ImageFeatures, SurgeryCLIP
from .pq_map import pair_probability, upsample_map
from .prompt_parsing import ParsedPrompt, parse_prompt

logger = logging.getLogger(__name__)

NOUN_UNMATCHED = "noun unmatched"
ADJECTIVE_UNMATCHED = "adjective unmatched"
EMPTY_PROMPT_SCORE = 1.0
"""Alignment score of an empty prompt: nothing was asked, so nothing is misaligned (documented neutral result)."""


@dataclass(frozen=True)
class PhraseReport:
    """One row of the per-phrase report: scores are eq. 5's CLS probabilities in [0, 1]."""

    phrase: str
    noun: str
    ancestor: str
    phrase_score: float
    noun_score: float
    defect: str | None
    weight: float


@dataclass(frozen=True)
class AlignmentQuality:
    """AQ-Map result for a batch.

    map: (B, H, W) defect map A in [0, 1] (1 = must change); score: (B,) a of eq. 8, a cosine in [-1, 1]
    (CLIP's image-text cosine, typically 0.1-0.4, times the cask penalties in [0, 1]);
    emphasized_prompts: B prompts with eq. 7's emphasis appended; reports: B lists of :class:`PhraseReport`;
    warnings: B lists of strings (truncation, no noun).
    """

    map: torch.Tensor
    score: torch.Tensor
    emphasized_prompts: list[str]
    reports: list[list[PhraseReport]]
    warnings: list[list[str]]


def emphasize_prompt(prompt: str, phrases: list[str], weight: float = 1.1) -> str:
    """eq. 7, ``prompt + 0.1 phs[j]``: append each defective phrase in ComfyUI emphasis syntax ``(phrase:1.1)``.

    Parentheses inside a phrase are escaped so the emphasis parses. Returns ``prompt`` unchanged for no phrases.
    """
    extra = [f"({phrase.replace('(', chr(92) + '(').replace(')', chr(92) + ')')}:{weight:g})" for phrase in phrases]
    if not extra:
        return prompt
    return ", ".join(([prompt.rstrip().rstrip(",")] if prompt.strip() else []) + extra)


def alignment_penalty(phrase_scores: torch.Tensor, beta: float) -> torch.Tensor:
    """The cask product of g-refine.txt eq. 8: ``prod_j min(a_phs[j] / beta, 1)``; phrase_scores: (J,) in [0, 1].

    Returns a scalar tensor in [0, 1] (1 for no phrases)."""
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}.")
    return torch.clamp(phrase_scores / beta, max=1.0).prod()


def select_defects(parsed: ParsedPrompt, phrase_scores, noun_scores, a_bound: float) -> list[tuple[int, str, int]]:
    """The two defect rules of g-refine.txt section 3.2 (eq. 6, cases as in the text).

    phrase_scores, noun_scores: per phrase j, a_phs[j] and a_pns[j] in [0, 1]. Returns (j, defect type,
    index of the phrase whose noun region is drawn) for each defective phrase.
    """
    defects = []
    for j, phrase in enumerate(parsed.phrases):
        if float(noun_scores[j]) < a_bound:
            defects.append((j, NOUN_UNMATCHED, phrase.ancestor))
        elif float(phrase_scores[j]) < float(noun_scores[j]):
            defects.append((j, ADJECTIVE_UNMATCHED, j))
    return defects


def alignment_quality(
    encoder: SurgeryCLIP,
    features: ImageFeatures,
    prompts: list[str],
    a_bound: float = 0.5,
    beta: float = 0.5,
    emphasis_weight: float = 1.1,
) -> AlignmentQuality:
    """AQ-Map A, score a, emphasized prompt and report for each image (g-refine.txt eq. 4-8, Algorithm 1).

    features: one :meth:`SurgeryCLIP.encode_image` forward of B images; prompts: B prompts, or 1 for all.
    a_bound: eq. 6 noun-presence bound on a_pns in (0, 1); beta: eq. 8 phrase bound in (0, 1].
    Per-phrase maps are eq. 5's ``softmax(scale * [cos(f, phrase), cos(f, "")])`` (feature surgery against "").
    Empty prompts give A = 0 and a = 1; prompts without a noun give A = 0 and a = the global cosine (empty
    product); text beyond the tower's context is truncated with a warning.
    """
    batch = features.cls_embedding.shape[0]
    if len(prompts) == 1 and batch > 1:
        prompts = list(prompts) * batch
    if len(prompts) != batch:
        raise ValueError(f"Got {len(prompts)} prompts for {batch} images: give one prompt, or one per image.")
    if not 0 < a_bound < 1:
        raise ValueError(f"a_bound must be in (0, 1), got {a_bound}.")
    grid_h, grid_w = features.patch_features.shape[1:3]
    defect_grids = torch.zeros(batch, grid_h, grid_w, device=features.patch_features.device)
    scores = torch.empty(batch)
    emphasized, reports, warnings = [], [], []
    empty_features = encoder.encode_text([""])[0]
    parsed_cache: dict[str, ParsedPrompt] = {}
    for index, prompt in enumerate(prompts):
        if prompt not in parsed_cache:
            parsed_cache[prompt] = parse_prompt(prompt)
        parsed = parsed_cache[prompt]
        notes = _length_warnings(encoder, parsed)
        if not parsed.text:
            scores[index] = EMPTY_PROMPT_SCORE
            emphasized.append(prompt)
            reports.append([])
            warnings.append(notes + ["empty prompt: nothing to align, A = 0 and a = 1"])
            continue
        global_cosine = features.cls_embedding[index] @ encoder.encode_text([parsed.text])[0]
        if not parsed.phrases:
            scores[index] = float(global_cosine)
            emphasized.append(prompt)
            reports.append([])
            warnings.append(notes + ["no noun in the prompt: A = 0 and a = the global image-text cosine"])
            continue
        phrase_texts = [phrase.text for phrase in parsed.phrases]
        noun_texts = [phrase.noun for phrase in parsed.phrases]
        text_features = encoder.encode_text(phrase_texts + noun_texts)  # (2J, D)
        pairs = torch.stack([text_features, empty_features.expand_as(text_features)], dim=1)  # (2J, 2, D)
        patch_probabilities = pair_probability(features.patch_features[index], pairs, encoder.logit_scale)
        cls_probabilities = pair_probability(features.cls_embedding[index], pairs, encoder.logit_scale)  # (2J,)
        count = len(parsed.phrases)
        phrase_scores, noun_scores = cls_probabilities[:count], cls_probabilities[count:]
        noun_maps = patch_probabilities[..., count:]  # (gh, gw, J): A_pns
        defects = select_defects(parsed, phrase_scores, noun_scores, a_bound)
        defect_of = {j: kind for j, kind, _ in defects}
        for _, _, region in defects:
            defect_grids[index] = torch.maximum(defect_grids[index], noun_maps[..., region])
        scores[index] = float(global_cosine * alignment_penalty(phrase_scores, beta))
        emphasized.append(emphasize_prompt(prompt, [phrase_texts[j] for j, _, _ in defects], emphasis_weight))
        reports.append(
            [
                PhraseReport(
                    phrase=phrase.text,
                    noun=phrase.noun,
                    ancestor=parsed.phrases[phrase.ancestor].text,
                    phrase_score=float(phrase_scores[j]),
                    noun_score=float(noun_scores[j]),
                    defect=defect_of.get(j),
                    weight=phrase.weight,
                )
                for j, phrase in enumerate(parsed.phrases)
            ]
        )
        warnings.append(notes)
    return AlignmentQuality(
        map=upsample_map(defect_grids, features.image_size),
        score=scores,
        emphasized_prompts=emphasized,
        reports=reports,
        warnings=warnings,
    )


def _length_warnings(encoder: SurgeryCLIP, parsed: ParsedPrompt) -> list[str]:
    tokens = encoder.count_tokens(parsed.text)
    if tokens > encoder.context_length:
        message = (
            f"prompt has {tokens} tokens, the quality CLIP reads {encoder.context_length}: the global score uses "
            f"the first {encoder.context_length}; every phrase is still scored on its own"
        )
        logger.warning(message)
        return [message]
    return []


def format_report(reports: list[list[PhraseReport]], scores: torch.Tensor, warnings: list[list[str]]) -> str:
    """A readable per-image, per-phrase table for users (the AQ-Map node's STRING output)."""
    lines = []
    for index, rows in enumerate(reports):
        lines.append(f"image {index}: alignment score a = {float(scores[index]):.4f}")
        for note in warnings[index]:
            lines.append(f"  note: {note}")
        if rows:
            lines.append("  phrase | noun | ancestor | a_phs | a_pns | defect")
        for row in rows:
            values = asdict(row)
            lines.append(
                "  {phrase} | {noun} | {ancestor} | {phrase_score:.3f} | {noun_score:.3f} | {defect}".format(
                    **{**values, "defect": values["defect"] or "-"}
                )
            )
    return "\n".join(lines)
