"""The method comparison's table against random: flip intervals and paired differences at the same keep, on
synthetic samples."""

import numpy as np
import pandas as pd
import pytest

from analysis.measure.paired import mean_interval, paired_difference
from benchmarks.method_comparison import markdown, versus_random


def _samples(rng, n=300):
    rows = []
    hard = rng.random(n) < 0.05
    for keep in (0.5, 0.25):
        flips = {"random": hard | (rng.random(n) < 0.3 * (1 - keep) + 0.05),
                 "fastv": hard & (rng.random(n) < 0.5),
                 "lofi": hard | (rng.random(n) < 0.25)}
        for method, flip in flips.items():
            rows += [{"sample_id": f"q{i}", "method": method, "keep": keep, "flip": bool(f), "correct": not f,
                      "baseline_correct": True} for i, f in enumerate(flip)]
    return pd.DataFrame(rows)


def test_each_method_gets_its_flip_interval_and_its_paired_difference_with_random():
    samples = _samples(np.random.default_rng(0))
    # another seed of random, in shuffled order: matched by question id, not by row
    seeds = samples[samples.method == "random"].sample(frac=1, random_state=1).assign(seed=1)
    seeds["flip"] = ~seeds["flip"]
    result = versus_random(samples, seeds).set_index(["method", "keep"])
    for (method, keep), frame in samples.groupby(["method", "keep"]):
        row, flips = result.loc[(method, keep)], frame.set_index("sample_id")["flip"].astype(float)
        expected = mean_interval(flips)
        assert (row.flip_rate, row.flip_low, row.flip_high) == (expected.estimate, expected.low, expected.high)
        if method == "random":
            assert pd.isna(row.minus_random)
            other = 1 - flips.mean()
            assert (row.random_min, row.random_max) == pytest.approx(sorted([flips.mean(), other]))
            continue
        random = samples[(samples.method == "random") & (samples.keep == keep)].set_index("sample_id")["flip"]
        d = paired_difference(flips.to_numpy(), random.astype(float).reindex(flips.index).to_numpy())
        assert (row.minus_random, row.minus_random_low, row.minus_random_high) == (d.estimate, d.low, d.high)
        assert row.fewer_than_random == (d.high < 0)
    assert result.loc[("fastv", 0.25)].fewer_than_random and not result.loc[("lofi", 0.5)].fewer_than_random
    text = markdown(result.reset_index())
    assert "minus random, points [95% CI]" in text and "flips % [95% CI]" in text
