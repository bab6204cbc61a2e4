"""Correlations and bootstrap intervals on synthetic data with a known correlation."""

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.measure.correlation import condition_correlation, permutation_p, sample_correlation, smallest_p


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


def test_no_relation_gives_an_interval_around_zero_and_calibrated_p_values():
    frame = _synthetic(slope=0.0, noise=1.0, seed=1)
    c = condition_correlation(frame, "delta_ipr", "kl", n_boot=300)
    assert c.pearson_low < 0 < c.pearson_high and c.pearson_p > 0.05
    # independent x and y: the permutation test rejects at 5% in about 5% of the trials
    rng = np.random.default_rng(5)
    rejected = [permutation_p(rng.normal(size=7), rng.normal(size=7)) < 0.05 for _ in range(400)]
    assert 0.02 < np.mean(rejected) < 0.09


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


def _reference(frame, n_boot, seed):
    """The per-resample loop the vectorised bootstrap replaces (scipy per resample)."""
    wide_x = frame.pivot_table(index="sample_id", columns=["method", "keep"], values="delta_ipr")
    wide_y = frame.pivot_table(index="sample_id", columns=["method", "keep"], values="kl")
    X, Y = wide_x.to_numpy(float), wide_y.to_numpy(float)

    def correlate(rows):
        mx, my = np.nanmean(X[rows], 0), np.nanmean(Y[rows], 0)
        return stats.pearsonr(mx, my).statistic, stats.spearmanr(mx, my).statistic

    rng = np.random.default_rng(seed)
    draws = np.array([correlate(rng.integers(0, len(X), len(X))) for _ in range(n_boot)])
    return correlate(np.arange(len(X))), np.percentile(draws, [2.5, 97.5], axis=0)


def test_the_vectorised_bootstrap_gives_the_per_resample_loops_numbers():
    frame = _synthetic(slope=0.5, noise=1.0, n_samples=40, seed=2)
    (pearson, spearman), interval = _reference(frame, n_boot=200, seed=7)
    c = condition_correlation(frame, "delta_ipr", "kl", n_boot=200, seed=7)
    np.testing.assert_allclose([c.pearson, c.spearman], [pearson, spearman], rtol=0, atol=1e-12)
    np.testing.assert_allclose([c.pearson_low, c.pearson_high], interval[:, 0], rtol=0, atol=1e-12)
    np.testing.assert_allclose([c.spearman_low, c.spearman_high], interval[:, 1], rtol=0, atol=1e-12)
    x, y = frame["delta_ipr"].to_numpy(), frame["kl"].to_numpy()
    rng = np.random.default_rng(3)
    draws = np.array([(stats.pearsonr(x[r], y[r]).statistic, stats.spearmanr(x[r], y[r]).statistic)
                      for r in (rng.integers(0, len(x), len(x)) for _ in range(100))])
    s = sample_correlation(x, y, n_boot=100, seed=3)
    np.testing.assert_allclose([s.pearson_low, s.pearson_high, s.spearman_low, s.spearman_high],
                               np.percentile(draws, [2.5, 97.5], axis=0).T.ravel(), rtol=0, atol=1e-12)


def test_permutation_p_is_exact_for_few_conditions_and_three_can_never_be_significant():
    x, y = np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 3.0])  # a perfect relation
    assert permutation_p(x, y) == pytest.approx(1 / 3)  # 2 of the 3! pairings reach |r| = 1
    assert smallest_p(3) == pytest.approx(1 / 3) and smallest_p(9) == pytest.approx(2 / 362880)
    rng = np.random.default_rng(0)
    x = rng.normal(size=6)
    y = x + rng.normal(0, 0.5, 6)
    pairings = [stats.pearsonr(x, y[list(p)]).statistic for p in itertools.permutations(range(6))]
    expected = np.mean(np.abs(pairings) >= abs(stats.pearsonr(x, y).statistic) - 1e-12)
    assert permutation_p(x, y) == pytest.approx(expected)
    frame = _synthetic(slope=2.0, noise=0.5)
    assert condition_correlation(frame, "delta_ipr", "kl", n_boot=50).pearson_p < 0.01  # 12 conditions
