"""Stable Preference losses (core/stable_preference.py) against hand-computed values on tiny inputs.

The expected numbers are written out from the paper's formulas (stable-preference.txt eq. 2-8) evaluated by hand:
softplus(x) = log(1 + e^x), sigmoid(x) = 1 / (1 + e^-x).
"""

from __future__ import annotations

import pytest
import torch

from comfyui_refinery.core import stable_preference as sp


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_clip_scores_are_logit_scaled_cosines():
    # image (2, 0) -> cos 0.6 with text (0.6, 0.8); image (3, 4) -> cos 1.0
    scores = sp.clip_scores(t(2.0, 0.0, 3.0, 4.0).view(1, 2, 2), t(0.6, 0.8).view(1, 2), 100.0)
    assert torch.allclose(scores, t(60.0, 100.0).view(1, 2))


def test_preference_loss_is_bradley_terry_cross_entropy():
    # -log(e^Sp / (e^Sp + e^Sr)): (2, 1) -> log(1 + e^-1); (0, 1) -> log(1 + e); tie -> log 2
    loss = sp.preference_loss(t(2.0, 0.0, 1.5), t(1.0, 1.0, 1.5))
    assert torch.allclose(loss, t(0.31326168751822286, 1.3132616875182228, 0.6931471805599453))


def test_anti_interference_loss_eq5_eq6():
    # pair 1: preferred 2.0 with views 1.5, 2.5, 2.2; rejected 0.5 with views 0.0, 1.0, 0.7
    #   inter = min(2, 1.5, 2.5, 2.2) - max(0.5, 0, 1, 0.7) = 0.5; intra = ((2.5 - 1.5) + (1.0 - 0.0)) / 2 = 1.0
    #   L_ai = -log(e^0.5 / (e^0.5 + e^1)) = log(1 + e^0.5) = 0.97407698...
    # pair 2: views equal to the originals 1.0 and -1.0: inter = 2, intra = 0, L_ai = log(1 + e^-2) = 0.12692801...
    loss = sp.anti_interference_loss(
        t(2.0, 1.0), t(0.5, -1.0), t(1.5, 2.5, 2.2, 1.0, 1.0, 1.0).view(2, 3), t(0.0, 1.0, 0.7, -1.0, -1.0, -1.0).view(2, 3)
    )
    assert torch.allclose(loss, t(0.9740769841801067, 0.1269280110429725))


def test_anti_interference_without_views_is_the_preference_loss():
    preferred, rejected = t(2.0, 0.0), t(1.0, 1.0)
    empty = torch.zeros(2, 0, dtype=torch.float64)
    assert torch.allclose(sp.anti_interference_loss(preferred, rejected, empty, empty),
                          sp.preference_loss(preferred, rejected))


def test_anti_interference_rejects_mismatched_views():
    with pytest.raises(ValueError, match="View scores"):
        sp.anti_interference_loss(t(1.0, 2.0), t(0.0, 0.0), torch.zeros(2, 3), torch.zeros(2, 2))


def test_order_weights_eq7():
    # 1 / (1 + exp((dS - 0.3) / 0.2)) at dS = 1.0, -0.5, 0.3: 1/(1+e^3.5), 1/(1+e^-4), 0.5
    weights = sp.order_weights(t(1.0, -0.5, 0.3), b=0.3, tau=0.2)
    assert torch.allclose(weights, t(0.02931223075135632, 0.9820137900379085, 0.5))


def test_margin_weights_eq8_favour_larger_margins():
    # softmax(1, 0, -1) = (e, 1, e^-1) / (e + 1 + e^-1)
    weights = sp.margin_weights(t(1.0, 0.0, -1.0))
    assert torch.allclose(weights, t(0.6652409557748219, 0.24472847105479767, 0.09003057317038046))
    assert float(weights.sum()) == pytest.approx(1.0)


def _example(requires_grad=False):
    """Two pairs. Pair 1: dS = 1, L_pref = log(1 + e^-1), L_ai = log(1 + e^0.5) (see above: inter 0.5, intra 1).
    Pair 2: dS = -1, views equal to the originals 0.0 and 1.0: L_pref = log(1 + e), inter = -1, intra = 0,
    L_ai = log(1 + e)."""
    preferred, rejected = t(2.0, 0.0), t(1.0, 1.0)
    preferred_views, rejected_views = t(1.5, 2.5, 2.2, 0.0, 0.0, 0.0).view(2, 3), t(0.0, 1.0, 0.7, 1.0, 1.0, 1.0).view(2, 3)
    for tensor in (preferred, rejected, preferred_views, rejected_views):
        tensor.requires_grad_(requires_grad)
    return preferred, rejected, preferred_views, rejected_views


def test_step_one_loss_eq7():
    # L = (1.28733867, 2.62652338); weights 1/(1+e^3.5) = 0.02931223, 1/(1+e^-6.5) = 0.99849882; mean of products
    result = sp.stable_preference_loss(*_example(), phase=1)
    assert torch.allclose(result.preference + result.anti_interference, t(1.2873386716983295, 2.6265233750364456))
    assert torch.allclose(result.weights, t(0.029312230751356333, 0.998498817743263))
    assert float(result.loss) == pytest.approx(1.3301576264744508, abs=1e-12)


def test_step_two_loss_eq8():
    # weights softmax(1, -1) = (0.88079708, 0.11920292); loss = sum of weight x L
    result = sp.stable_preference_loss(*_example(), phase=2)
    assert torch.allclose(result.weights, t(0.8807970779778824, 0.11920292202211756))
    assert float(result.loss) == pytest.approx(1.4469734014635556, abs=1e-12)


def test_weights_are_detached():
    # d loss / d S_preferred[0] in step 1 = w_1 * dL_pref/dS / 2 = 0.02931223 * (-sigmoid(-1)) / 2 (S = 2.0 is
    # neither the min nor the max of its views, so L_ai does not depend on it); a gradient through the weight
    # would add L_1 * dw/dS. d loss / d (view 1.5, the minimum): L_ai = softplus(intra - inter), the view enters
    # inter with +1 and intra with -1/2: -1.5 * sigmoid(0.5) * w_1 / 2.
    preferred, rejected, preferred_views, rejected_views = _example(requires_grad=True)
    sp.stable_preference_loss(preferred, rejected, preferred_views, rejected_views, phase=1).loss.backward()
    assert float(preferred.grad[0]) == pytest.approx(-0.003941636500897526, abs=1e-12)
    assert float(preferred_views.grad[0, 0]) == pytest.approx(-0.013684253662142775, abs=1e-12)


def test_loss_without_views_and_bad_phase():
    preferred, rejected, _, _ = _example()
    result = sp.stable_preference_loss(preferred, rejected, None, None, phase=2)
    assert torch.equal(result.anti_interference, torch.zeros(2, dtype=torch.float64))
    expected = 0.8807970779778824 * 0.31326168751822286 + 0.11920292202211756 * 1.3132616875182228
    assert float(result.loss) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="phase"):
        sp.stable_preference_loss(preferred, rejected, None, None, phase=3)


def test_phase_schedule():
    assert sp.step_one_steps(30000) == 3000
    assert sp.phase_for_step(0, 30000) == 1
    assert sp.phase_for_step(2999, 30000) == 1
    assert sp.phase_for_step(3000, 30000) == 2
    assert sp.phase_for_step(0, 10, fraction=0.0) == 2
    with pytest.raises(ValueError):
        sp.step_one_steps(10, fraction=1.5)


def test_weak_augment_identity_flip_and_determinism():
    images = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(0))
    identity = sp.weak_augment(images, 2, torch.Generator().manual_seed(1), scale=(1.0, 1.0), ratio=(0.75, 0.75),
                               flip_probability=0.0)
    assert identity.shape == (2, 2, 3, 16, 12)
    assert torch.equal(identity[:, 0], images) and torch.equal(identity[:, 1], images)
    flipped = sp.weak_augment(images, 1, torch.Generator().manual_seed(1), scale=(1.0, 1.0), ratio=(0.75, 0.75),
                              flip_probability=1.0)
    assert torch.equal(flipped[:, 0], images.flip(-1))
    first = sp.weak_augment(images, 3, torch.Generator().manual_seed(7))
    again = sp.weak_augment(images, 3, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    assert not torch.equal(first[:, 0], first[:, 1])  # independent views
    assert (first - images[:, None]).abs().mean() < 0.35  # weak: still the same picture


def test_crop_box_stays_in_bounds_and_scale():
    generator = torch.Generator().manual_seed(3)
    for _ in range(300):
        top, left, height, width = sp._crop_box(64, 64, (0.85, 1.0), (0.75, 4 / 3), generator)
        assert 0 <= top and top + height <= 64 and 0 <= left and left + width <= 64
        assert 0.82 <= height * width / 64**2 <= 1.0
        assert 0.7 <= width / height <= 1.4


def test_weak_augment_checks_arguments():
    with pytest.raises(ValueError, match="B, C, H, W"):
        sp.weak_augment(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="crop scale"):
        sp.weak_augment(torch.zeros(1, 3, 8, 8), scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="tau"):
        sp.order_weights(t(0.0), tau=0.0)
