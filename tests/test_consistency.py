"""Consistency measures against scipy and hand-worked cases."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import softmax
from scipy.stats import entropy

from analysis.measure.consistency import (
    accuracy,
    flips,
    forced_kl,
    js_divergence,
    kl_divergence,
    normalize_answer,
)


def test_normalisation():
    assert normalize_answer("  Yes. ") == "yes"
    assert normalize_answer("Red!\n") == "red"
    assert normalize_answer("two  words") == "two words"
    assert normalize_answer(None) == ""


def test_kl_and_js_against_scipy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 40, generator=g) * 3, torch.randn(5, 40, generator=g) * 3
    p, q = softmax(a.double().numpy(), -1), softmax(b.double().numpy(), -1)
    np.testing.assert_allclose(kl_divergence(a, b).numpy(), entropy(p, q, axis=-1), rtol=1e-10)
    np.testing.assert_allclose(js_divergence(a, b).numpy(), jensenshannon(p, q, axis=-1) ** 2, rtol=1e-8)
    assert kl_divergence(a, b).shape == (5,)


def test_identical_distributions_give_zero():
    a = torch.randn(3, 2, 11)
    assert torch.equal(kl_divergence(a, a), torch.zeros(3, 2, dtype=torch.float64))
    assert js_divergence(a, a).abs().max() < 1e-15


def test_disjoint_support():
    inf = float("inf")
    p = torch.tensor([[0.0, 0.0, -inf, -inf]])  # mass on tokens 0, 1
    q = torch.tensor([[-inf, -inf, 0.0, 0.0]])  # mass on tokens 2, 3
    assert js_divergence(p, q).item() == pytest.approx(math.log(2))
    assert kl_divergence(p, q).item() == inf  # documented: KL is infinite off the support
    # with finite logits the pruned model never gives exactly zero probability: KL is large but finite
    far = torch.tensor([[0.0, 0.0, -80.0, -80.0]])
    assert math.isfinite(kl_divergence(far, -far).item())
    assert kl_divergence(q, p.clamp_min(-1e30)).item() > 1e29


def test_flips_hand_worked():
    base = ["yes", "red", "3", "no", "circle"]
    pruned = ["Yes", "blue", "4", "yes", "circle."]
    gold = ["yes", "red", "2", "yes", "square"]
    f = flips(base, pruned, gold)
    assert (f.n, f.changed) == (5, 3)
    assert f.flip_rate == pytest.approx(0.6)
    assert (f.c_to_i, f.i_to_c) == (1, 1)          # red->blue is C->I; no->yes is I->C; 3->4 is I->I
    assert f.dutta_flips == pytest.approx(0.4)
    assert accuracy(base, gold) == accuracy(pruned, gold)  # accuracy hides both flips
    no_gold = flips(base, pruned)
    assert no_gold.c_to_i is None and no_gold.dutta_flips is None and no_gold.changed == 3


def test_forced_kl_averages_only_answer_positions():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])
    per = kl_divergence(a, b)
    out = forced_kl(a, b, mask)
    assert out[0].item() == pytest.approx(per[0, 1:3].mean().item())
    assert out[1].item() == 0


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 baseline answers but 1"):
        flips(["a", "b"], ["a"])
