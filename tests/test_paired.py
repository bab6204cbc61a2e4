"""Bootstrap intervals of rates and paired differences, against a numpy reference of the same resamples."""

import numpy as np
import pytest

from analysis.measure.paired import mean_interval, paired_difference


def _numpy_percentile_interval(values, n_boot, seed, confidence=0.95):
    """The percentile bootstrap written out: scipy draws integers(0, n, (n_boot, n)) from default_rng(seed)."""
    values = np.asarray(values, float)
    draws = np.random.default_rng(seed).integers(0, len(values), (n_boot, len(values)))
    means = values[draws].mean(1)
    alpha = (1 - confidence) / 2
    return np.percentile(means, [100 * alpha, 100 * (1 - alpha)])


def test_the_interval_of_a_flip_rate_is_the_percentile_bootstrap_of_its_mean():
    flips = np.random.default_rng(1).random(300) < 0.12
    result = mean_interval(flips, n_boot=1000, seed=7)
    assert result.estimate == pytest.approx(flips.mean()) and result.n == 300
    np.testing.assert_allclose([result.low, result.high], _numpy_percentile_interval(flips, 1000, 7), rtol=1e-12)
    assert result.low < result.estimate < result.high
    assert mean_interval(flips, n_boot=1000, seed=7) == result  # seeded


def test_a_paired_difference_keeps_the_pairs_and_detects_a_real_gap():
    rng = np.random.default_rng(2)
    hard = rng.random(400) < 0.3  # questions hard for both methods: the pairing removes this shared noise
    a = hard | (rng.random(400) < 0.10)
    b = hard & (rng.random(400) < 0.9)
    d = paired_difference(a, b, n_boot=1000, seed=3)
    assert d.estimate == pytest.approx(a.mean() - b.mean())
    np.testing.assert_allclose([d.low, d.high], _numpy_percentile_interval(a.astype(float) - b, 1000, 3), rtol=1e-12)
    assert d.excludes_zero and d.low > 0
    same = paired_difference(a, a)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero


def test_degenerate_and_bad_input():
    assert mean_interval([0, 0, 0]).as_dict() == {"estimate": 0.0, "low": 0.0, "high": 0.0, "n": 3, "confidence": 0.95}
    empty = mean_interval([])
    assert empty.n == 0 and np.isnan(empty.estimate)
    with pytest.raises(ValueError, match="two 1-D arrays of one length"):
        paired_difference([1, 0], [1, 0, 1])
