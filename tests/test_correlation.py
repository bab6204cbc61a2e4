"""Correlations and bootstrap intervals on synthetic data with a known correlation."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.correlation import condition_correlation, sample_correlation


def _synthetic(slope, noise, n_samples=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for method_effect, method in zip([0.0, 0.5, 1.0, 1.5], ["a", "b", "c", "d"]):
        for keep, keep_effect in [(0.5, 0.0), (0.25, 0.8), (0.1, 1.6)]:
            level = method_effect + keep_effect
            for i in range(n_samples):
                x = level + rng.normal(0, 0.3)
                rows.append({"sample_id": i, "method": method, "keep": keep, "delta_ipr": x,
                             "kl": slope * level + rng.normal(0, noise)})
    return pd.DataFrame(rows)


def test_condition_level_recovers_a_strong_relation():
    frame = _synthetic(slope=2.0, noise=0.5)
    c = condition_correlation(frame, "delta_ipr", "kl", n_boot=300)
    means = frame.groupby(["method", "keep"])[["delta_ipr", "kl"]].mean()
    assert c.n == 12
    assert c.pearson == pytest.approx(stats.pearsonr(means.delta_ipr, means.kl).statistic)
    assert c.spearman == pytest.approx(stats.spearmanr(means.delta_ipr, means.kl).statistic)
    assert c.pearson > 0.95 and c.pearson_low <= c.pearson <= c.pearson_high
    assert c.pearson_low > 0.9


def test_no_relation_gives_an_interval_around_zero():
    frame = _synthetic(slope=0.0, noise=1.0)
    c = condition_correlation(frame, "delta_ipr", "kl", n_boot=300)
    assert c.pearson_low < 0 < c.pearson_high or abs(c.pearson) < 0.7


def test_bootstrap_is_seeded():
    frame = _synthetic(slope=1.0, noise=1.0, n_samples=50)
    assert condition_correlation(frame, "delta_ipr", "kl", n_boot=100, seed=4) == \
        condition_correlation(frame, "delta_ipr", "kl", n_boot=100, seed=4)


def test_sample_level_with_known_rho():
    rng = np.random.default_rng(1)
    rho = 0.6
    x = rng.normal(size=4000)
    y = rho * x + np.sqrt(1 - rho**2) * rng.normal(size=4000)
    c = sample_correlation(x, y, n_boot=300)
    assert c.pearson_low < rho < c.pearson_high
    assert c.pearson_high - c.pearson_low < 0.1
    assert c.n == 4000


def test_constant_input_is_nan_not_an_error():
    c = sample_correlation(np.ones(10), np.arange(10.0), n_boot=20)
    assert np.isnan(c.pearson) and c.resamples == 0
