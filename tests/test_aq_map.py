"""AQ-Map (g-refine.txt eq. 5-8): defect rules, cask penalty, emphasis, and the whole map against an
independent computation on hand-built features; documented neutral results for empty and noun-less prompts."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_refinery.core import aq_map, pq_map
from comfyui_refinery.core.clip_surgery import ImageFeatures, load_quality_clip
from comfyui_refinery.core.prompt_parsing import parse_prompt
from tiny_models import build_tiny_vit


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_quality_clip(build_tiny_vit(tmp_path_factory.mktemp("quality_clip")))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_defect_rules_follow_the_text_not_the_printed_eq6():
    parsed = parse_prompt("a cat wearing a blue hat")
    assert [(p.noun, parsed.phrases[p.ancestor].noun) for p in parsed.phrases] == [("cat", "cat"), ("hat", "cat")]
    # hat missing (a_pns < a_bound): drawn on its ancestor, the cat
    assert aq_map.select_defects(parsed, [0.95, 0.1], [0.9, 0.2], a_bound=0.5) == [(1, aq_map.NOUN_UNMATCHED, 0)]
    # the cat is there but not as described (a_phs < a_pns): drawn on its own region
    assert aq_map.select_defects(parsed, [0.7, 0.9], [0.9, 0.8], a_bound=0.5) == [(0, aq_map.ADJECTIVE_UNMATCHED, 0)]
    # the hat's adjective is wrong: drawn on the hat
    assert aq_map.select_defects(parsed, [0.95, 0.6], [0.9, 0.8], a_bound=0.5) == [(1, aq_map.ADJECTIVE_UNMATCHED, 1)]
    assert aq_map.select_defects(parsed, [0.95, 0.9], [0.9, 0.8], a_bound=0.5) == []


def test_alignment_penalty_by_hand():
    scores = torch.tensor([0.9, 0.3, 0.45])
    torch.testing.assert_close(aq_map.alignment_penalty(scores, 0.5), torch.tensor(1.0 * 0.6 * 0.9))
    torch.testing.assert_close(aq_map.alignment_penalty(torch.zeros(0), 0.5), torch.tensor(1.0))
    with pytest.raises(ValueError, match="beta must be in"):
        aq_map.alignment_penalty(scores, 0.0)


def test_emphasized_prompt_uses_comfyui_syntax():
    assert aq_map.emphasize_prompt("a cat, ", ["blue hat", "a (small) dog"]) == (
        r"a cat, (blue hat:1.1), (a \(small\) dog:1.1)"
    )
    assert aq_map.emphasize_prompt("a cat", []) == "a cat"
    assert aq_map.emphasize_prompt("", ["cat"], weight=1.2) == "(cat:1.2)"


def test_alignment_quality_against_independent_computation(encoder):
    prompt = "a cat wearing a blue hat"
    parsed = parse_prompt(prompt)
    phrase_texts = [p.text for p in parsed.phrases]
    nouns = [p.noun for p in parsed.phrases]
    text = {t: encoder.encode_text([t])[0] for t in phrase_texts + nouns + ["", parsed.text]}
    torch.manual_seed(3)
    # 1x2 patch grid: the left patch looks like "cat", the right like nothing; the CLS is a random direction.
    patches = torch.stack([text["cat"], text[""]])[None, None]  # (1, 1, 2, D)
    cls = torch.nn.functional.normalize(torch.randn(1, text[""].shape[0]), dim=-1)
    features = ImageFeatures(cls, patches, image_size=(6, 10))
    scale, a_bound, beta = 10.0, 0.5, 0.5  # the default temperature of eq. 5's scores and eq. 8's g (METHODS.md 1.3)

    def probability(feature, t, temperature=scale):  # eq. 5: softmax over {t, ""} == sigmoid of the logit difference
        return sigmoid(temperature * float(feature @ text[t] - feature @ text[""]))

    phrase_scores = [probability(cls[0], t) for t in phrase_texts]
    noun_scores = [probability(cls[0], t) for t in nouns]
    expected_grid, map_grid_at_10 = torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)
    expected_defects = {}
    for j, phrase in enumerate(parsed.phrases):
        if noun_scores[j] < a_bound:
            region, kind = phrase.ancestor, aq_map.NOUN_UNMATCHED
        elif phrase_scores[j] < noun_scores[j]:
            region, kind = j, aq_map.ADJECTIVE_UNMATCHED
        else:
            continue
        expected_defects[phrase.text] = kind
        for column in range(2):  # the maps keep the model's logit scale by default (map_temperature)
            value = probability(patches[0, 0, column], nouns[region], encoder.logit_scale)
            expected_grid[0, 0, column] = max(float(expected_grid[0, 0, column]), value)
            value = probability(patches[0, 0, column], nouns[region], 10.0)
            map_grid_at_10[0, 0, column] = max(float(map_grid_at_10[0, 0, column]), value)
    # eq. 8 on the probability scale: g = sigmoid(10 * (cos(img, prompt) - cos(img, ""))), times the cask product
    expected_score = probability(cls[0], parsed.text) * math.prod(min(s / beta, 1.0) for s in phrase_scores)

    result = aq_map.alignment_quality(encoder, features, [prompt], a_bound=a_bound, beta=beta)
    assert expected_defects, "the random CLS should leave at least one phrase unmatched"
    assert {row.phrase: row.defect for row in result.reports[0] if row.defect} == expected_defects
    torch.testing.assert_close(result.map, pq_map.upsample_map(expected_grid, (6, 10)))
    assert result.score.item() == pytest.approx(expected_score, rel=1e-5)
    assert [row.phrase_score for row in result.reports[0]] == pytest.approx(phrase_scores, rel=1e-5)
    assert result.emphasized_prompts[0] == aq_map.emphasize_prompt(prompt, list(expected_defects))
    assert result.has_target == [True]
    assert 0.0 < result.score.item() < 1.0
    flat = aq_map.alignment_quality(encoder, features, [prompt], a_bound=a_bound, beta=beta, map_temperature=10.0)
    torch.testing.assert_close(flat.map, pq_map.upsample_map(map_grid_at_10, (6, 10)))
    assert flat.score.item() == pytest.approx(expected_score, rel=1e-5)  # the map's temperature leaves a alone


def test_temperatures_are_knobs_and_the_default_does_not_saturate(encoder):
    """eq. 5 at temperature T: a noun whose cosine beats "" by 0.05 scores sigmoid(0.05 T): 0.62 at T = 10, while
    CLIP's logit scale (100) saturates it to 0.99. The two temperatures act on their own terms."""
    prompt = "a cat"
    text = {t: encoder.encode_text([t])[0] for t in ("a cat", "cat", "")}
    cls = torch.nn.functional.normalize(torch.randn(1, text[""].shape[0], generator=torch.Generator().manual_seed(1)),
                                        dim=-1)
    features = ImageFeatures(cls, cls[:, None, None, :], image_size=(4, 4))  # one patch equal to the CLS

    def cosine_gap(t):
        return float(cls[0] @ text[t] - cls[0] @ text[""])

    for temperature, global_temperature in ((10.0, 10.0), (3.0, 25.0), (100.0, 1.0)):
        result = aq_map.alignment_quality(encoder, features, [prompt], beta=0.5, temperature=temperature,
                                          global_temperature=global_temperature)
        (row,) = result.reports[0]
        assert row.phrase_score == pytest.approx(sigmoid(temperature * cosine_gap("a cat")), rel=1e-5)
        assert row.noun_score == pytest.approx(sigmoid(temperature * cosine_gap("cat")), rel=1e-5)
        expected = sigmoid(global_temperature * cosine_gap("a cat")) * min(row.phrase_score / 0.5, 1.0)
        assert result.score.item() == pytest.approx(expected, rel=1e-5)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        for knob in ("temperature", "global_temperature", "map_temperature"):
            with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
                aq_map.alignment_quality(encoder, features, [prompt], **{knob: bad})


def test_global_term_and_score_of_eq8_by_hand():
    cls = torch.tensor([1.0, 0.0])
    prompt, empty = torch.tensor([0.6, 0.8]), torch.tensor([0.8, 0.6])  # cosines 0.6 and 0.8
    assert aq_map.global_alignment(cls, prompt, empty).item() == pytest.approx(sigmoid(10 * (0.6 - 0.8)))
    assert aq_map.global_alignment(cls, empty, prompt, 4.0).item() == pytest.approx(sigmoid(4 * 0.2))
    batch = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(aq_map.global_alignment(batch, prompt, empty),
                               torch.tensor([sigmoid(-2.0), sigmoid(2.0)]))
    g = torch.tensor(0.8)
    assert aq_map.alignment_score(g, torch.tensor([0.9, 0.3, 0.45]), 0.5).item() == pytest.approx(0.8 * 0.6 * 0.9)
    assert aq_map.alignment_score(g, torch.zeros(0), 0.5).item() == pytest.approx(0.8)


def test_neutral_results_for_empty_and_nounless_prompts(encoder):
    images = torch.rand(2, 20, 30, 3)
    features = encoder.encode_image(images)
    result = aq_map.alignment_quality(encoder, features, ["", "very beautiful"])
    assert result.map.shape == (2, 20, 30) and float(result.map.abs().max()) == 0.0
    # nothing to align: a = 1 for both (no longer the raw cosine for the noun-less one), flagged for the plan
    assert result.score.tolist() == [aq_map.EMPTY_PROMPT_SCORE] * 2
    assert result.has_target == [False, False]
    assert "empty prompt" in result.warnings[0][0] and "no noun" in result.warnings[1][0]
    assert "follows p alone" in result.warnings[1][0]
    assert result.emphasized_prompts == ["", "very beautiful"]
    report = aq_map.format_report(result.reports, result.score, result.warnings)
    assert "empty prompt" in report and "no noun" in report


def test_long_and_non_ascii_prompts(encoder, caplog):
    features = encoder.encode_image(torch.rand(1, 16, 16, 3))
    long_prompt = ", ".join(f"a red ball number {i} near a green box" for i in range(60))
    result = aq_map.alignment_quality(encoder, features, [long_prompt])
    assert "tokens" in result.warnings[0][0] and len(result.reports[0]) >= 100
    assert "tokens" in caplog.text
    result = aq_map.alignment_quality(encoder, features, ["a café in Zürich with a 猫 🐱"])
    assert torch.isfinite(result.map).all() and math.isfinite(result.score.item())


def test_batches_take_one_prompt_or_one_per_image(encoder):
    features = encoder.encode_image(torch.rand(3, 16, 24, 3))
    shared = aq_map.alignment_quality(encoder, features, ["a red circle"])
    assert shared.map.shape == (3, 16, 24) and len(shared.reports) == 3
    separate = aq_map.alignment_quality(encoder, features, ["a red circle", "a dog", "two cats"])
    assert [rows[0].noun for rows in separate.reports] == ["circle", "dog", "cats"]
    with pytest.raises(ValueError, match="Got 2 prompts for 3 images"):
        aq_map.alignment_quality(encoder, features, ["a", "b"])
