"""Loss-based pruning (pure): which scored training conversations to drop and why, and the scores' summary.

Each training conversation carries one score, its mean target loss under a scoring model (``sftray.eval.scoring``
computes it inside the pipeline's actor pool). The highest ``drop_highest`` share is dropped as likely noise or
mislabels (``pruned_high_loss``), the lowest ``drop_lowest`` share as what the model knows already
(``pruned_low_loss``). Conversations rank by (loss, key), so equal losses fall on the same side in every run.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HIGH_LOSS = "pruned_high_loss"
LOW_LOSS = "pruned_low_loss"
PRUNE_REASONS = (HIGH_LOSS, LOW_LOSS)
"""Drop reasons of pruning (policy drops: counted in the report, never raised)."""
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
"""The score quantiles the report lists."""
HISTOGRAM_BINS = 20
"""Equal-width bins of the report's score histogram, from the lowest score to the highest."""
SCORE_COLUMNS = ("key", "loss", "n_targets")
"""What a scorer returns per conversation: its key, mean target loss (nats per target token) and target count."""


@dataclass(frozen=True, kw_only=True)
class Scoring:
    """A scorer as the prep recipe hands it to the pipeline, so the data layer never loads a model itself."""

    model: str
    """The scoring model as configured (for the report and logs)."""
    identity: Any
    """What identifies the model's weights (file names, sizes, times; or a hub id): part of the scores' cache key."""
    actor: type
    """A callable class for ``map_batches``: built once per actor with ``kwargs``, then Arrow batches of ``key``,
    ``input_ids`` and ``labels`` -> ``SCORE_COLUMNS``."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """The actor's constructor keywords."""


def scores_key(*, identity: Any, data_fingerprint: str) -> str:
    """The cache key of a scoring: the scoring model and the data fingerprint without the prune config (changing only
    the shares reuses the scores)."""
    parts = {"model": identity, "data": data_fingerprint}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def select_pruned(
    keys: Sequence[int], losses: Sequence[float], *, drop_highest: float, drop_lowest: float
) -> dict[int, str]:
    """{key: reason} of the conversations to drop: the ``floor(drop_highest x scored)`` highest-loss ones
    (``HIGH_LOSS``) and the ``floor(drop_lowest x scored)`` lowest-loss ones (``LOW_LOSS``).

    A NaN loss (no target token, e.g. a truncated conversation's answer cut away) is not scored: it is never pruned
    and does not count towards the shares.
    """
    keys = np.asarray(keys, dtype=np.uint64)
    losses = np.asarray(losses, dtype=np.float64)
    scored = ~np.isnan(losses)
    keys, losses = keys[scored], losses[scored]
    order = np.lexsort((keys, losses))  # by loss, then key: ties are broken the same way every run
    n_high = math.floor(drop_highest * len(keys) + 1e-9)  # 0.1 x 1900 is 190.00000000000003 in floating point
    n_low = min(math.floor(drop_lowest * len(keys) + 1e-9), len(keys) - n_high)
    out = {int(k): LOW_LOSS for k in keys[order[:n_low]]}
    out.update({int(k): HIGH_LOSS for k in keys[order[len(order) - n_high :]]})
    return out


def summary(losses: Sequence[float], pruned: dict[int, str], keys: Sequence[int]) -> dict[str, Any]:
    """The score distribution for the report: count, mean, std, min/max, ``QUANTILES``, a ``HISTOGRAM_BINS``-bin
    histogram, and the two thresholds (the lowest dropped-high and the highest dropped-low loss; None when off)."""
    losses = np.asarray(losses, dtype=np.float64)
    reasons = np.asarray([pruned.get(int(k), "") for k in keys], dtype=object)
    scored = ~np.isnan(losses)
    values = losses[scored]
    if not len(values):
        return {"count": 0, "unscored": int((~scored).sum())}
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS)
    high, low = losses[reasons == HIGH_LOSS], losses[reasons == LOW_LOSS]
    return {
        "count": int(len(values)),
        "unscored": int((~scored).sum()),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "quantiles": {f"p{round(q * 100):02d}": float(np.quantile(values, q)) for q in QUANTILES},
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
        "high_threshold": float(high.min()) if len(high) else None,
        "low_threshold": float(low.max()) if len(low) else None,
    }
