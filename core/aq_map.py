"""G-Refine alignment quality map (AQ-Map): g-refine.txt eq. 4-8 and Algorithm 1, METHODS.md 1.3.

Map convention: A is a *defect* map in [0, 1], 1 = must change, 0 where the prompt is satisfied. The paper
writes eq. 6 multiplicatively over an initial A = 1 ("where to act"); our A is the union (max) of the selected
phrase regions, which is the same selection read as "where it is wrong". The printed eq. 6 has its two cases
swapped; we follow the text (METHODS.md 1.3):
- noun unmatched (``a_pns[j] < a_bound``): the object is missing, draw the phrase on its ancestor's noun region;
- adjective unmatched (``a_phs[j] < a_pns[j]``, noun present): draw it on its own noun's region.

Scales (METHODS.md 1.3): every score is a probability in [0, 1]. eq. 5's phrase and noun scores are
``softmax(T * [cos(f, phrase), cos(f, "")])[0]`` with the temperature T a knob (default 10 as the official AQ script;
at the model's logit scale, about 100, they saturate to 0/1 and eq. 8's cask product becomes a cliff). eq. 8's
global term is on the same scale, ``g = sigmoid(T_g * (cos(f_img, prompt) - cos(f_img, "")))`` (T_g = 10, the
official script's form), not the raw image-text cosine (about 0.1-0.35 for real CLIP), so that eq. 9's
``(p + a) / 2`` mixes two probabilities. The defect rules compare scores of one temperature with each other and with
bounds, so at the default bounds (0.5) which phrases are defective does not depend on T.

The per-patch maps (eq. 5's A_pns, drawn into A) keep the model's logit scale by default (``map_temperature``): the
refine mask thresholds 1 - P + A at 0.5, and at temperature 10 a noun map flattens towards 0.5 everywhere, so the
mask of a flagged picture grows to nearly all of it (toy world, 87 flagged pictures: 99.5 % of each picture at 10,
87 % at toy-clip's own scale 26.4, 69 % at 100). The ordering of patches, hence localisation, is the same at any
temperature.

Nothing to align: an empty prompt, or one without a noun, gives A = 0 and a = 1 (``has_target`` False). The
refiner's plan then leaves a out of the stage-1 strength, which follows p alone (core/refine_plan.py).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass

import torch

from .clip_surgery import ImageFeatures, SurgeryCLIP
from .pq_map import pair_probability, upsample_map
from .prompt_parsing import ParsedPrompt, parse_prompt

logger = logging.getLogger(__name__)

NOUN_UNMATCHED = "noun unmatched"
ADJECTIVE_UNMATCHED = "adjective unmatched"
EMPTY_PROMPT_SCORE = 1.0
"""Alignment score a of an empty or noun-less prompt: nothing was asked, so nothing is misaligned (documented
neutral result; the refiner's stage-1 strength then follows p alone)."""
PARSE_CACHE_SIZE = 256
"""Prompts whose parse :func:`alignment_quality` keeps (the parse, pure Python, costs about as much as the rest of
the AQ-Map arithmetic; a batch under one prompt, or a node run again, parses once)."""
DEFAULT_TEMPERATURE = 10.0
"""Softmax temperature of eq. 5 (phrase and noun scores) and of eq. 8's global term g: the official AQ script's 10.
CLIP's own logit scale (about 100) saturates the scores to 0/1."""


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

    map: (B, H, W) defect map A in [0, 1] (1 = must change); score: (B,) a of eq. 8 in [0, 1], the probability g
    that the image fits the prompt better than the empty prompt times the cask penalties in [0, 1];
    emphasized_prompts: B prompts with eq. 7's emphasis appended; reports: B lists of :class:`PhraseReport`;
    warnings: B lists of strings (truncation, no noun); has_target: B bools, False where the prompt is empty or has
    no noun (then A = 0 and a = :data:`EMPTY_PROMPT_SCORE`, and the refiner's strength follows p alone).
    """

    map: torch.Tensor
    score: torch.Tensor
    emphasized_prompts: list[str]
    reports: list[list[PhraseReport]]
    warnings: list[list[str]]
    has_target: list[bool]


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


def global_alignment(cls_embedding: torch.Tensor, prompt_features: torch.Tensor, empty_features: torch.Tensor,
                     temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """The global term g of g-refine.txt eq. 8 on the probability scale (METHODS.md 1.3, the official script's form):
    ``g = sigmoid(T * (cos(f_img, f_text(prompt)) - cos(f_img, f_text(""))))``.

    cls_embedding: (..., D) L2-normalised image embeddings; prompt_features, empty_features: (D,) L2-normalised text
    embeddings of the prompt and of ""; temperature T > 0. Returns (...) in [0, 1]; 0.5 = the prompt fits the image
    no better than the empty prompt. (The same two-way softmax as eq. 5, :func:`pq_map.pair_probability`.)
    """
    _check_temperature(temperature)
    pair = torch.stack([prompt_features, empty_features])[None]  # (1, 2, D)
    return pair_probability(cls_embedding, pair, temperature)[..., 0]


def alignment_score(global_term: torch.Tensor, phrase_scores: torch.Tensor, beta: float) -> torch.Tensor:
    """a of g-refine.txt eq. 8: ``a = g * prod_j min(a_phs[j] / beta, 1)``.

    global_term: g of :func:`global_alignment` in [0, 1]; phrase_scores: (J,) eq. 5 CLS scores in [0, 1]; beta in
    (0, 1]. Returns a in [0, 1] (g itself for no phrases)."""
    return global_term * alignment_penalty(phrase_scores, beta)


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r} (the official AQ script uses "
                         f"{DEFAULT_TEMPERATURE:g}; CLIP's own logit scale is about 100).")


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
    temperature: float = DEFAULT_TEMPERATURE,
    global_temperature: float = DEFAULT_TEMPERATURE,
    map_temperature: float | None = None,
) -> AlignmentQuality:
    """AQ-Map A, score a, emphasized prompt and report for each image (g-refine.txt eq. 4-8, Algorithm 1).

    features: one :meth:`SurgeryCLIP.encode_image` forward of B images; prompts: B prompts, or 1 for all.
    a_bound: eq. 6 noun-presence bound on a_pns in (0, 1); beta: eq. 8 phrase bound in (0, 1].
    temperature: T of eq. 5's phrase and noun scores ``softmax(T * [cos(f, phrase), cos(f, "")])`` (feature
    surgery against ""), default 10 as the official AQ script; global_temperature: T_g of eq. 8's global term
    (:func:`global_alignment`), default 10; map_temperature: T of eq. 5's per-patch maps A_pns (None = the model's
    logit scale, see the module docstring). a is :func:`alignment_score`, in [0, 1].
    Empty prompts and prompts without a noun give A = 0, a = 1 and ``has_target`` False (nothing to align: the
    refiner's strength follows p alone); text beyond the tower's context is truncated with a warning.
    """
    batch = features.cls_embedding.shape[0]
    if len(prompts) == 1 and batch > 1:
        prompts = list(prompts) * batch
    if len(prompts) != batch:
        raise ValueError(f"Got {len(prompts)} prompts for {batch} images: give one prompt, or one per image.")
    if not 0 < a_bound < 1:
        raise ValueError(f"a_bound must be in (0, 1), got {a_bound}.")
    _check_temperature(temperature)
    _check_temperature(global_temperature)
    map_temperature = encoder.logit_scale if map_temperature is None else map_temperature
    _check_temperature(map_temperature)
    grid_h, grid_w = features.patch_features.shape[1:3]
    defect_grids = torch.zeros(batch, grid_h, grid_w, device=features.patch_features.device)
    scores = torch.empty(batch)
    emphasized, reports, warnings, has_target = [], [], [], []
    empty_features = encoder.encode_text([""])[0]
    for index, prompt in enumerate(prompts):
        parsed = _parse_prompt_cached(prompt)
        notes = _length_warnings(encoder, parsed)
        if not parsed.phrases:
            what = "no noun in the prompt" if parsed.text else "empty prompt"
            scores[index] = EMPTY_PROMPT_SCORE
            emphasized.append(prompt)
            reports.append([])
            has_target.append(False)
            warnings.append(notes + [f"{what}: nothing to align, A = 0 and a = 1 (the refiner's stage-1 strength "
                                     "follows p alone)"])
            continue
        global_term = global_alignment(features.cls_embedding[index], encoder.encode_text([parsed.text])[0],
                                       empty_features, global_temperature)
        phrase_texts = [phrase.text for phrase in parsed.phrases]
        noun_texts = [phrase.noun for phrase in parsed.phrases]
        text_features = encoder.encode_text(phrase_texts + noun_texts)  # (2J, D)
        pairs = torch.stack([text_features, empty_features.expand_as(text_features)], dim=1)  # (2J, 2, D)
        patch_probabilities = pair_probability(features.patch_features[index], pairs, map_temperature)  # (gh, gw, 2J)
        cls_probabilities = pair_probability(features.cls_embedding[index], pairs, temperature)  # (2J,)
        count = len(parsed.phrases)
        phrase_scores, noun_scores = cls_probabilities[:count], cls_probabilities[count:]
        noun_maps = patch_probabilities[..., count:]  # (gh, gw, J): A_pns
        defects = select_defects(parsed, phrase_scores, noun_scores, a_bound)
        defect_of = {j: kind for j, kind, _ in defects}
        for _, _, region in defects:
            defect_grids[index] = torch.maximum(defect_grids[index], noun_maps[..., region])
        scores[index] = float(alignment_score(global_term, phrase_scores, beta))
        has_target.append(True)
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
        has_target=has_target,
    )


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def _parse_prompt_cached(prompt: str) -> ParsedPrompt:
    """:func:`.prompt_parsing.parse_prompt`, remembered for the last :data:`PARSE_CACHE_SIZE` prompts (the result is
    read, never changed, here)."""
    return parse_prompt(prompt)


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
