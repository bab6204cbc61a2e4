"""Correlation of Delta IPR with consistency measures, with seeded bootstrap CIs (SPEC section 3).

Condition level: one point per condition (method, setting); x = mean Delta IPR, y = a consistency
measure (flip rate, Flips, mean KL, ...). The bootstrap resamples *samples* (the same resampled ids
for every condition) and recomputes every condition mean, so the interval reflects the finite
benchmark. Sample level: pooled |Delta IPR| against per-sample KL over all conditions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats


@dataclass(frozen=True)
class Correlation:
    """Pearson r and Spearman rho with percentile bootstrap 95% intervals.

    Attributes:
        n: points correlated (conditions, or pooled samples).
        pearson, pearson_low, pearson_high: r and its 95% CI.
        spearman, spearman_low, spearman_high: rho and its 95% CI.
        resamples: bootstrap resamples that produced a defined value (constant resamples are skipped).
    """

    n: int
    pearson: float
    pearson_low: float
    pearson_high: float
    spearman: float
    spearman_low: float
    spearman_high: float
    resamples: int

    def as_dict(self) -> dict:
        return asdict(self)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.pearsonr(x, y).statistic)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def _interval(values: list[float]) -> tuple[float, float]:
    finite = np.asarray([v for v in values if np.isfinite(v)])
    if not len(finite):
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def condition_correlation(frame: pd.DataFrame, x: str, y: str, *, condition=("method", "keep"),
                          sample: str = "sample_id", n_boot: int = 1000, seed: int = 0) -> Correlation:
    """Correlate condition means of ``x`` and ``y`` (per-sample columns of ``frame``).

    ``frame`` has one row per (sample, condition). Bootstrap: draw samples with replacement, take every
    condition's mean over the drawn samples (duplicates counted), correlate; 95% percentile interval.
    """
    condition = list(condition)
    wide_x = frame.pivot_table(index=sample, columns=condition, values=x, aggfunc="mean")
    wide_y = frame.pivot_table(index=sample, columns=condition, values=y, aggfunc="mean")
    wide_x, wide_y = wide_x.align(wide_y, join="inner")
    X, Y = wide_x.to_numpy(float), wide_y.to_numpy(float)

    def correlate(rows: np.ndarray) -> tuple[float, float]:
        mx, my = np.nanmean(X[rows], axis=0), np.nanmean(Y[rows], axis=0)
        keep = np.isfinite(mx) & np.isfinite(my)
        return _pearson(mx[keep], my[keep]), _spearman(mx[keep], my[keep])

    everything = np.arange(len(X))
    pearson, spearman = correlate(everything)
    rng = np.random.default_rng(seed)
    draws = [correlate(rng.integers(0, len(X), len(X))) for _ in range(n_boot)]
    p_low, p_high = _interval([d[0] for d in draws])
    s_low, s_high = _interval([d[1] for d in draws])
    return Correlation(X.shape[1], pearson, p_low, p_high, spearman, s_low, s_high,
                       sum(np.isfinite(d[0]) for d in draws))


def sample_correlation(x: np.ndarray, y: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> Correlation:
    """Correlate paired per-sample values (e.g. pooled |Delta IPR| and KL), bootstrapping the pairs."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        rows = rng.integers(0, len(x), len(x))
        draws.append((_pearson(x[rows], y[rows]), _spearman(x[rows], y[rows])))
    p_low, p_high = _interval([d[0] for d in draws])
    s_low, s_high = _interval([d[1] for d in draws])
    return Correlation(len(x), _pearson(x, y), p_low, p_high, _spearman(x, y), s_low, s_high,
                       sum(np.isfinite(d[0]) for d in draws))
