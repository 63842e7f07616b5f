"""95% intervals of eval figures: pure functions over counts and per-item values (scipy's, not hand-written).

- A rate over probes (format compliance, exact match): the Wilson score interval of k successes in n probes
  (``scipy.stats.binomtest(...).proportion_ci(method="wilson")``); it stays inside [0, 1] and keeps its coverage
  near 0 and 1, where the normal approximation does not.
- A mean over held-out items (val loss over examples, pretraining loss over windows): a BCa bootstrap of the mean
  (``scipy.stats.bootstrap``), which corrects the percentile interval's bias and skew for the small samples an eval
  holds.
- Forgetting (the relative rise of a loss over the base's on the same windows): a paired BCa bootstrap that
  resamples windows, each with its trained and its base loss, so the windows' shared difficulty cancels out.

Every function takes the confidence level (0.95 by default) and, for the bootstrap, a seed: the same inputs give
the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CONFIDENCE = 0.95
RESAMPLES = 2000
"""Bootstrap resamples: the interval's ends move by well under 1% of its width between seeds at this count."""


def wilson(successes: int, trials: int, *, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a rate of ``successes`` in ``trials``; (nan, nan) without trials."""
    if trials == 0:
        return math.nan, math.nan
    from scipy.stats import binomtest

    ci = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def wilson_half_width(rate: float, trials: int, *, confidence: float = CONFIDENCE) -> float:
    """Half the width of the Wilson interval at ``rate`` over ``trials`` (rate x trials rounded to a count)."""
    lo, hi = wilson(round(rate * trials), trials, confidence=confidence)
    return (hi - lo) / 2


def probes_for_half_width(rate: float, half_width: float, *, confidence: float = CONFIDENCE) -> int:
    """The fewest probes whose Wilson interval at ``rate`` is at most ``half_width`` either side (on average)."""
    n = 1
    while wilson_half_width(rate, n, confidence=confidence) > half_width:
        n = n * 2
    low, high = n // 2, n  # the half-width shrinks with n (up to the rounding of rate x n): bisect
    while high - low > 1:
        mid = (low + high) // 2
        if wilson_half_width(rate, mid, confidence=confidence) > half_width:
            low = mid
        else:
            high = mid
    return high


def bootstrap_mean(
    values: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """The BCa bootstrap interval of the mean of ``values``; (nan, nan) for fewer than 2 (no spread to resample)."""
    import numpy as np
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=float)
    if data.size < 2 or np.all(data == data[0]):
        return (math.nan, math.nan) if data.size < 2 else (float(data[0]), float(data[0]))
    result = bootstrap(
        (data,), np.mean, confidence_level=confidence, n_resamples=resamples, method="BCa", rng=seed, vectorized=True
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def bootstrap_relative_rise(
    trained: Sequence[float],
    base: Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """The paired BCa bootstrap interval of mean(trained) / mean(base) - 1, resampling items (each with both its
    losses); (nan, nan) for fewer than 2 items."""
    import numpy as np
    from scipy.stats import bootstrap

    t, b = np.asarray(trained, dtype=float), np.asarray(base, dtype=float)
    if t.shape != b.shape:
        raise ValueError(f"paired values differ in count: {t.size} trained, {b.size} base")
    if t.size < 2:
        return math.nan, math.nan

    def rise(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return x.mean(axis=axis) / y.mean(axis=axis) - 1.0

    result = bootstrap(
        (t, b),
        rise,
        paired=True,
        confidence_level=confidence,
        n_resamples=resamples,
        method="BCa",
        rng=seed,
        vectorized=True,
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
