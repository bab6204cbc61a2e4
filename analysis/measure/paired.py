"""Confidence intervals of per-sample rates, alone and paired (docs/definitions.md#intervals), as pure functions.

A flip rate is the mean of a 0/1 outcome per sample; two methods run on the same samples are compared
by the mean of their per-sample differences, so the interval keeps the pairing (a question that is hard
for one method tends to be hard for the other). Both intervals are percentile bootstraps over samples
drawn by ``scipy.stats.bootstrap`` from ``numpy.random.default_rng(seed)``: seeded, so a run's tables
are reproducible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided percentile bootstrap interval.

    Attributes:
        estimate: the statistic on all samples.
        low, high: the interval's bounds (equal to ``estimate`` when every resample agrees).
        n: samples.
        confidence: the interval's level (0.95: 95%).
    """

    estimate: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or wholly below 0."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return asdict(self)


def mean_interval(values, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval:
    """Mean of ``values`` (e.g. 0/1 flips: the flip rate, sum(v) / n) with its percentile bootstrap interval.

    NaN bounds for no samples; a constant sample gives the degenerate interval [mean, mean].
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {values.shape}")
    n = len(values)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, confidence)
    estimate = float(values.mean())
    if np.all(values == values[0]):
        return Interval(estimate, estimate, estimate, n, confidence)
    result = stats.bootstrap((values,), np.mean, n_resamples=n_boot, confidence_level=confidence,
                             method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return Interval(estimate, float(low), float(high), n, confidence)


def paired_difference(a, b, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval:
    """mean(a) - mean(b) over the same samples (a[i] and b[i] from sample i), with the percentile bootstrap
    interval of resampled *samples* (the pairs move together): e.g. method A's flip rate minus method B's."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes need two 1-D arrays of one length, got shapes {a.shape} and {b.shape}")
    return mean_interval(a - b, confidence, n_boot, seed)
