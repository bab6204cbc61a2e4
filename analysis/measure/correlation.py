"""Correlation of Delta IPR with consistency measures, with seeded bootstrap CIs (docs/definitions.md#correlation).

Condition level: one point per condition (method, setting); x = mean Delta IPR, y = a consistency
measure (flip rate, Flips, mean KL, ...). The bootstrap resamples *samples* (the same resampled ids
for every condition) and recomputes every condition mean, so the interval reflects the finite
benchmark -- not the choice of conditions. Whether the conditions show a relation at all is what the
permutation test answers: it re-pairs the condition means at random, and with k conditions its
smallest attainable two-sided p-value is about 2 / k! (1/3 for 3 conditions), so few conditions can
never support a claim, however tight the bootstrap interval. Sample level: pooled |Delta IPR|
against per-sample KL over all conditions (no p-value: pooled rows of one sample are not independent).

Resamples are drawn by ``scipy.stats.bootstrap`` from ``numpy.random.default_rng(seed)`` and evaluated all
at once: a resample is represented by how often it draws each item, so every resample's means, r and
rho (of the resample's own average ranks) come from a few matrix products.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

MIN_POINTS = 3                 # fewer points: every correlation is NaN
EXACT_PERMUTATIONS = 7         # up to 7 conditions (5,040 pairings) the permutation test is exact
PERMUTATION_RESAMPLES = 9999   # above that, a seeded Monte Carlo test
CHUNK_VALUES = 1 << 22          # bootstrap values computed at once at the sample level


@dataclass(frozen=True)
class Correlation:
    """Pearson r and Spearman rho with percentile bootstrap 95% intervals.

    Attributes:
        n: points correlated (conditions, or pooled samples).
        pearson, pearson_low, pearson_high: r and its 95% CI.
        spearman, spearman_low, spearman_high: rho and its 95% CI.
        resamples: bootstrap resamples that produced a defined value (constant resamples are skipped).
        pearson_p, spearman_p: two-sided permutation p-values across the points (condition level only;
            NaN at the sample level or with fewer than 3 points).
    """

    n: int
    pearson: float
    pearson_low: float
    pearson_high: float
    spearman: float
    spearman_low: float
    spearman_high: float
    resamples: int
    pearson_p: float = float("nan")
    spearman_p: float = float("nan")

    def as_dict(self) -> dict:
        return asdict(self)


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of ``x`` and ``y`` [..., n]: sum(x'y') / sqrt(sum x'^2 sum y'^2) with
    x' = x - mean(x); NaN where a row has fewer than 3 points or is constant (as ``scipy.stats.pearsonr``
    refuses). Rows must be finite."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    xc, yc = x - x.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    defined = (np.ptp(x, -1) > 0) & (np.ptp(y, -1) > 0) & (x.shape[-1] >= MIN_POINTS)
    with np.errstate(invalid="ignore", divide="ignore"):
        xn = xc / np.linalg.norm(xc, axis=-1, keepdims=True)
        yn = yc / np.linalg.norm(yc, axis=-1, keepdims=True)
        r = np.clip((xn * yn).sum(-1), -1.0, 1.0)
    return np.where(defined, r, np.nan)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair: the Pearson r of the ranks (ties get their average rank)."""
    return pearson_rows(stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1))


def _finite_rows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pearson, spearman) per row, each row restricted to its positions where both are finite."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.all():
        return pearson_rows(x, y), spearman_rows(x, y)
    pearson, spearman = np.full(len(x), np.nan), np.full(len(x), np.nan)
    full = ok.all(-1)
    pearson[full], spearman[full] = pearson_rows(x[full], y[full]), spearman_rows(x[full], y[full])
    for i in np.flatnonzero(~full):  # rare: a condition with no defined value in this resample
        pearson[i] = pearson_rows(x[i, ok[i]], y[i, ok[i]])
        spearman[i] = spearman_rows(x[i, ok[i]], y[i, ok[i]])
    return pearson, spearman


def _interval(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def permutation_p(x: np.ndarray, y: np.ndarray, statistic=pearson_rows, seed: int = 0) -> float:
    """Two-sided p-value P(|statistic| >= |observed|) over every re-pairing of x with y (exact up to
    ``EXACT_PERMUTATIONS`` points, else ``PERMUTATION_RESAMPLES`` seeded random pairings); NaN when the
    statistic is undefined."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < MIN_POINTS or not np.isfinite(statistic(x, y)):
        return float("nan")
    if statistic is spearman_rows:  # re-pairing permutes the ranks too: rank once
        x, y, statistic = stats.rankdata(x), stats.rankdata(y), pearson_rows
    exact = len(x) <= EXACT_PERMUTATIONS
    result = stats.permutation_test(  # permuting x alone visits every pairing once; p = P(|r*| >= |r|)
        (x,), lambda a, axis=-1: np.abs(statistic(a, np.broadcast_to(y, a.shape))), permutation_type="pairings",
        vectorized=True,
        n_resamples=math.factorial(len(x)) if exact else PERMUTATION_RESAMPLES, batch=20_000,
        alternative="greater", rng=np.random.default_rng(seed))
    return float(result.pvalue)


def smallest_p(n_points: int) -> float:
    """The smallest two-sided permutation p-value ``n_points`` distinct pairs can reach: 2 / n! (max 1)."""
    return min(1.0, 2 / math.factorial(n_points)) if n_points >= 1 else 1.0


def _bootstrap(statistic, n: int, n_boot: int, seed: int) -> np.ndarray:
    """[2, n_boot]: (Pearson, Spearman) of ``statistic(draws)`` on ``n_boot`` resamples of n items, drawn by
    ``scipy.stats.bootstrap`` from ``numpy.random.default_rng(seed)`` (``integers(0, n, (n_boot, n))``).
    ``statistic`` maps [resamples, n] item indices to [2, resamples]."""
    def batched(draws, axis=-1):
        out = statistic(np.atleast_2d(draws))
        return out if np.ndim(draws) > 1 else out[:, 0]

    with warnings.catch_warnings():  # constant resamples give NaN, which the intervals leave out
        warnings.simplefilter("ignore")
        result = stats.bootstrap((np.arange(n),), batched, vectorized=True, n_resamples=n_boot, batch=None,
                                 method="percentile", rng=np.random.default_rng(seed))
    return np.asarray(result.bootstrap_distribution).reshape(2, n_boot)


def condition_correlation(frame: pd.DataFrame, x: str, y: str, *, condition=("method", "keep"),
                          sample: str = "sample_id", n_boot: int = 1000, seed: int = 0) -> Correlation:
    """Correlate condition means of ``x`` and ``y`` (per-sample columns of ``frame``).

    ``frame`` has one row per (sample, condition). Bootstrap: draw samples with replacement, take every
    condition's mean over the drawn samples (duplicates counted), correlate; 95% percentile interval.
    The permutation p-values test the full-data r and rho across the conditions.
    """
    condition = list(condition)
    wide_x = frame.pivot_table(index=sample, columns=condition, values=x, aggfunc="mean")
    wide_y = frame.pivot_table(index=sample, columns=condition, values=y, aggfunc="mean")
    wide_x, wide_y = wide_x.align(wide_y, join="inner")
    X, Y = wide_x.to_numpy(float), wide_y.to_numpy(float)
    with warnings.catch_warnings():  # a condition with no value in a resample is NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        mx, my = np.nanmean(X, 0), np.nanmean(Y, 0)
        keep = np.isfinite(mx) & np.isfinite(my)
        pearson, spearman = (float(v) for v in (pearson_rows(mx[keep], my[keep]),
                                                spearman_rows(mx[keep], my[keep])))

        def resampled(draws):  # every condition's mean over the drawn questions, then r and rho
            counts = _draw_counts(draws, len(X))
            return np.stack(_finite_rows(_resampled_means(counts, X), _resampled_means(counts, Y)))

        boot_pearson, boot_spearman = _bootstrap(resampled, len(X), n_boot, seed)
    return Correlation(X.shape[1], pearson, *_interval(boot_pearson), spearman, *_interval(boot_spearman),
                       int(np.isfinite(boot_pearson).sum()),
                       permutation_p(mx[keep], my[keep], pearson_rows, seed),
                       permutation_p(mx[keep], my[keep], spearman_rows, seed))


def sample_correlation(x: np.ndarray, y: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> Correlation:
    """Correlate paired per-sample values (e.g. pooled |Delta IPR| and KL), bootstrapping the pairs.

    A resample is represented by how often it draws each pair (``counts``), so its Pearson r is a
    count-weighted correlation and its Spearman rho the weighted correlation of the resample's own
    average ranks (``_resample_ranks``): the same numbers as ranking every resample, at O(n) each.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)

    def resampled(draws):
        chunk = max(1, CHUNK_VALUES // max(1, n))  # memory: a few [chunk, n] arrays at a time
        out = []
        for start in range(0, len(draws), chunk):
            counts = _draw_counts(draws[start:start + chunk], n)
            out.append(np.stack([_weighted_pearson(counts, x, y),
                                 _weighted_pearson(counts, _resample_ranks(counts, x), _resample_ranks(counts, y))]))
        return np.concatenate(out, axis=1)

    boot_pearson, boot_spearman = _bootstrap(resampled, n, n_boot, seed)
    return Correlation(n, float(pearson_rows(x, y)), *_interval(boot_pearson),
                       float(spearman_rows(x, y)), *_interval(boot_spearman),
                       int(np.isfinite(boot_pearson).sum()))


def _draw_counts(draws: np.ndarray, n: int) -> np.ndarray:
    """[resamples, n] float: how often each resample (a row of ``draws``, indices < n) drew each item."""
    rows = len(draws)
    return np.bincount((draws + n * np.arange(rows)[:, None]).ravel(), minlength=rows * n).reshape(rows, n) * 1.0


def _resampled_means(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[resamples, columns]: each column's mean over each resample's draws, NaN entries left out (NaN
    where a resample drew no defined value), as ``np.nanmean(values[draws], 1)``."""
    defined = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ np.where(defined, values, 0.0)) / (counts @ defined)


def _weighted_pearson(counts: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each resample given by ``counts`` [resamples, n] over the values x, y ([n] or
    [resamples, n]); NaN where a resample's x or y is constant, as ``pearson_rows`` gives."""
    total = counts.sum(-1, keepdims=True)
    xc = x - (counts * x).sum(-1, keepdims=True) / total
    yc = y - (counts * y).sum(-1, keepdims=True) / total
    sxx, syy = (counts * xc * xc).sum(-1), (counts * yc * yc).sum(-1)
    drawn = counts > 0
    spread_x = np.where(drawn, x, np.inf).min(-1) < np.where(drawn, x, -np.inf).max(-1)
    spread_y = np.where(drawn, y, np.inf).min(-1) < np.where(drawn, y, -np.inf).max(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip((counts * xc * yc).sum(-1) / np.sqrt(sxx * syy), -1.0, 1.0)
    return np.where(spread_x & spread_y & (x.shape[-1] >= MIN_POINTS), r, np.nan)


def _resample_ranks(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[resamples, n]: the average rank each value would get within each resample (equal values, and a
    value drawn several times, share their mean rank), from the draw counts alone."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])  # groups of equal values
    group = np.cumsum(np.r_[True, sorted_values[1:] != sorted_values[:-1]]) - 1
    in_group = np.add.reduceat(counts[:, order], starts, axis=1)                  # [resamples, groups]
    rank = np.cumsum(in_group, axis=1) - in_group + (in_group + 1) / 2
    ranks = np.empty_like(counts)
    ranks[:, order] = rank[:, group]
    return ranks
