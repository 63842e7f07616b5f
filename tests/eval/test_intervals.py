"""The intervals' coverage on simulated data: over 2,000 simulated evals each 95% interval holds the true value
93-97% of the time (the binomial standard error of a 95% coverage over 2,000 draws is 0.5 points)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sftray.eval import intervals

DRAWS = 2000


def _coverage(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


@pytest.mark.parametrize(("rate", "probes"), [(0.5, 64), (0.9, 64), (0.9, 256)])
def test_wilson_covers_the_true_rate(rate, probes):
    rng = np.random.default_rng(0)
    hits = []
    for k in rng.binomial(probes, rate, size=DRAWS):
        lo, hi = intervals.wilson(int(k), probes)
        hits.append(lo <= rate <= hi)
    assert 0.93 <= _coverage(hits) <= 0.97


def test_bootstrap_of_a_mean_loss_covers_the_true_mean():
    """Per-example losses are skewed (gamma, shape 4, mean 2.0), 100 examples per eval."""
    rng = np.random.default_rng(1)
    hits = []
    for _ in range(DRAWS):
        lo, hi = intervals.bootstrap_mean(rng.gamma(4.0, 0.5, size=100), resamples=999, seed=int(rng.integers(1e9)))
        hits.append(lo <= 2.0 <= hi)
    assert 0.93 <= _coverage(hits) <= 0.97


def test_paired_bootstrap_of_forgetting_covers_the_true_rise():
    """Windows differ in difficulty (base loss gamma around 3.0); training raises each by 3% plus noise: the true
    relative rise is 0.03. The pairing makes the interval far narrower than the windows' spread."""
    rng = np.random.default_rng(2)
    hits, widths = [], []
    for _ in range(DRAWS):
        base = rng.gamma(9.0, 1 / 3, size=64)
        trained = base * 1.03 + rng.normal(0.0, 0.05, size=64)
        lo, hi = intervals.bootstrap_relative_rise(trained, base, resamples=999, seed=int(rng.integers(1e9)))
        hits.append(lo <= 0.03 <= hi)
        widths.append(hi - lo)
    assert 0.93 <= _coverage(hits) <= 0.97
    assert np.median(widths) < 0.01  # unpaired, the windows' spread alone would make it ~0.2 wide


def test_probe_count_for_four_points_at_ninety_percent():
    n = intervals.probes_for_half_width(0.9, 0.04)
    assert intervals.wilson_half_width(0.9, n) <= 0.04 < intervals.wilson_half_width(0.9, n - 1)
    assert 200 < n < 240  # the normal approximation's 1.96^2 x 0.09 / 0.04^2 = 216, Wilson's differs a little
    assert intervals.wilson_half_width(0.9, 64) == pytest.approx(0.075, abs=0.01)  # the issue's +/-7 points at 64


def test_degenerate_inputs_give_nan_or_a_point_not_an_error():
    assert all(math.isnan(v) for v in intervals.wilson(0, 0))
    assert all(math.isnan(v) for v in intervals.bootstrap_mean([1.0]))
    assert intervals.bootstrap_mean([2.0, 2.0, 2.0]) == (2.0, 2.0)
    with pytest.raises(ValueError, match="differ in count"):
        intervals.bootstrap_relative_rise([1.0, 2.0], [1.0])
