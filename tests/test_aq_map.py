"""AQ-Map (g-refine.txt eq. 5-8): defect rules, cask penalty, emphasis, and the whole map against a hand
computation on features built with chosen cosines; documented neutral results for empty and noun-less prompts."""

from __future__ import annotations

import math

import pytest
import torch

from comfyui_refinery.core import aq_map
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


def unit_vector_with_cosines(directions: torch.Tensor, cosines: list[float], seed: int) -> torch.Tensor:
    """A unit vector whose cosine with ``directions[k]`` (unit rows, (K, D), linearly independent) is ``cosines[k]``:
    the least-norm solution of ``directions @ x = cosines`` plus a random part orthogonal to every direction that
    brings its norm to 1. Builds image features whose every eq. 5 score is known before the call."""
    basis = directions.double()
    target = torch.tensor(cosines, dtype=torch.float64)
    gram = basis @ basis.T  # (K, K)
    least_norm = basis.T @ torch.linalg.solve(gram, target)  # (D,)
    assert least_norm.norm() < 1, "these cosines need a vector longer than 1: choose smaller ones"
    free = torch.randn(basis.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    free = free - basis.T @ torch.linalg.solve(gram, basis @ free)  # orthogonal to every direction
    vector = least_norm + (1 - least_norm.square().sum()).sqrt() * free / free.norm()
    torch.testing.assert_close(basis @ vector, target)
    return vector.float()


def test_alignment_quality_against_hand_computation(encoder):
    """Two pictures for "a cat wearing a blue hat", built so that every cosine is chosen (with "": 0.1; the
    scores are sigmoid(10 x (cosine - 0.1)), numbers by hand). Picture 0: the cat, no hat; picture 1: the cat and a
    hat that is not blue. Patches: a 1 x 2 grid, a cat on the left, a hat on the right."""
    prompt = "a cat wearing a blue hat"
    phrases = ["a cat", "wearing a blue hat"]  # nouns cat, hat; the hat phrase hangs from the cat (ancestor 0)
    texts = ["", "cat", "hat", *phrases, prompt]
    directions = encoder.encode_text(texts)  # (6, D) unit rows
    base = 0.1  # cos(image, "")
    #                 ""    cat         hat          a cat       wearing ... hat  prompt
    picture_0 = [base, base + 0.1, base - 0.1, base + 0.2, base - 0.2, base + 0.1]  # hat missing
    picture_1 = [base, base + 0.1, base + 0.15, base + 0.2, base + 0.05, base + 0.05]  # hat there, not blue
    cat_patch = [base, base + 0.05, base - 0.05]  # cosines with "", cat, hat
    hat_patch = [base, base - 0.05, base + 0.05]
    cls = torch.stack([unit_vector_with_cosines(directions, picture_0, seed=0),
                       unit_vector_with_cosines(directions, picture_1, seed=1)])  # (2, D)
    patch_row = torch.stack([unit_vector_with_cosines(directions[:3], cat_patch, seed=2),
                             unit_vector_with_cosines(directions[:3], hat_patch, seed=3)])  # (2, D): left, right
    patches = patch_row[None, None].expand(2, 1, 2, -1)  # (B, gh, gw, D) = (2, 1, 2, D), the same in both pictures
    features = ImageFeatures(cls, patches, image_size=(3, 2))  # 3 x 2 pixels: the 1 x 2 grid stretched in height

    beta = 0.95  # above every phrase score: each phrase lowers a (eq. 8's product, not its weakest term alone)
    result = aq_map.alignment_quality(encoder, features, [prompt], a_bound=0.5, beta=beta, map_temperature=10.0)

    # eq. 5, temperature 10: picture 0: a cat 0.881, cat 0.731, wearing a blue hat 0.119, hat 0.269 (< a_bound:
    # the hat is missing, drawn on its ancestor the cat); picture 1: hat 0.818 >= a_bound but its phrase 0.622 is
    # lower (the adjective does not match: drawn on the hat itself).
    rows_0, rows_1 = result.reports
    assert [(r.phrase, r.noun, r.ancestor) for r in rows_0] == [("a cat", "cat", "a cat"),
                                                               ("wearing a blue hat", "hat", "a cat")]
    assert [(r.phrase_score, r.noun_score) for r in rows_0] == [
        (pytest.approx(sigmoid(2.0), abs=1e-5), pytest.approx(sigmoid(1.0), abs=1e-5)),
        (pytest.approx(sigmoid(-2.0), abs=1e-5), pytest.approx(sigmoid(-1.0), abs=1e-5))]
    assert [(r.phrase_score, r.noun_score) for r in rows_1] == [
        (pytest.approx(sigmoid(2.0), abs=1e-5), pytest.approx(sigmoid(1.0), abs=1e-5)),
        (pytest.approx(sigmoid(0.5), abs=1e-5), pytest.approx(sigmoid(1.5), abs=1e-5))]
    assert [r.defect for r in rows_0] == [None, aq_map.NOUN_UNMATCHED]
    assert [r.defect for r in rows_1] == [None, aq_map.ADJECTIVE_UNMATCHED]
    assert result.emphasized_prompts == ["a cat wearing a blue hat, (wearing a blue hat:1.1)"] * 2
    assert result.has_target == [True, True]
    # eq. 8: a = g x prod_j min(a_phs[j] / beta, 1), g = sigmoid(10 x (cos(prompt) - cos(""))):
    # picture 0: 0.731 x (0.881 / 0.95) x (0.119 / 0.95) = 0.085; picture 1: 0.622 x 0.927 x (0.622 / 0.95) = 0.378
    assert result.score.tolist() == pytest.approx([sigmoid(1.0) * sigmoid(2.0) / beta * sigmoid(-2.0) / beta,
                                                   sigmoid(0.5) * sigmoid(2.0) / beta * sigmoid(0.5) / beta], abs=1e-5)
    # A: picture 0 draws the cat's noun map (left patch 0.622, right 0.378 at temperature 10), picture 1 the hat's;
    # a grid one patch high stretches to every row of the picture
    cat_map, hat_map = [sigmoid(0.5), sigmoid(-0.5)], [sigmoid(-0.5), sigmoid(0.5)]
    torch.testing.assert_close(result.map, torch.tensor([[cat_map] * 3, [hat_map] * 3]), atol=1e-5, rtol=0)

    # the maps keep the model's logit scale by default: sigmoid(scale x 0.05) on the marked patch; a is unchanged
    sharp = aq_map.alignment_quality(encoder, features, [prompt], a_bound=0.5, beta=beta)
    high, low = sigmoid(encoder.logit_scale * 0.05), sigmoid(-encoder.logit_scale * 0.05)
    torch.testing.assert_close(sharp.map, torch.tensor([[[high, low]] * 3, [[low, high]] * 3]), atol=1e-4, rtol=0)
    torch.testing.assert_close(sharp.score, result.score)


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
