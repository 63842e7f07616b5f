"""A sweep's verdict: its configurations over their seeds, and whether the best beats the runner-up beyond noise.

Pure functions over trial results (no Ray, no MLflow):

- ``summarize``: one configuration's selected-epoch metrics over its seeds, each as a mean and a 95% t-interval
  (seeds are few: the t distribution widens the interval for it), and its probe rates pooled over every
  (seed, probe) with their Wilson interval.
- ``compare``: the best configuration against the runner-up on the selection metric, in its direction. A probe
  rate (format compliance, exact match) is compared over (seed, probe) units: each unit is one probe answered by
  both configurations' runs of one seed, its difference -1, 0 or +1; the interval resamples seeds and probes
  (``crossed_bootstrap``), paired because both sides answer the same probes with the same seeds. A loss has no
  per-example record across runs, so its units are the seeds (paired differences, t-interval). ``clear``: the
  interval excludes 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sftray.eval.intervals import CONFIDENCE, RESAMPLES, wilson
from sftray.eval.metrics import DIRECTIONS, EXACT_MATCH, FORMAT_COMPLIANCE, MAX

PROBE_FIELDS = {FORMAT_COMPLIANCE: "compliant", EXACT_MATCH: "exact_match"}
"""Probe-rate metric -> the probe table's per-probe verdict it averages."""
CLEAR, WITHIN_NOISE = "clear", "within_noise"


def configuration_key(overrides: dict[str, Any], *, seed_key: str) -> str:
    """A configuration's identity: every swept key but the replicate seed."""
    return json.dumps({k: v for k, v in sorted(overrides.items()) if k != seed_key}, default=str)


def mean_interval(values: Sequence[float], *, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean and its t-interval over ``values`` (seeds); one value: (it, nan, nan)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    half = t.ppf(0.5 + confidence / 2, len(vals) - 1) * sd / math.sqrt(len(vals))
    return mean, mean - half, mean + half


def probe_outcomes(table: Sequence[dict[str, Any]], metric: str) -> list[float]:
    """Per-probe 0/1 outcomes of a probe-rate metric (exact match: the probes with an answer to compare)."""
    field = PROBE_FIELDS[metric]
    rows = table if metric != EXACT_MATCH else [r for r in table if r.get("reference") is not None]
    return [float(bool(r[field])) for r in rows]


def summarize(runs: Sequence[dict[str, Any]], *, metrics: Sequence[str]) -> dict[str, Any]:
    """One configuration over its runs (``seed``, ``metrics``: the selected epoch's, ``probes``: its probe table
    or None): per metric mean/lo/hi over seeds, and each probe rate pooled over every (seed, probe)."""
    out: dict[str, Any] = {"seeds": sorted(r["seed"] for r in runs), "metrics": {}, "pooled": {}}
    for metric in metrics:
        mean, lo, hi = mean_interval([r["metrics"].get(metric, math.nan) for r in runs])
        if metric in PROBE_FIELDS and not math.isnan(lo):  # a rate's interval stays within [0, 1]
            lo, hi = max(lo, 0.0), min(hi, 1.0)
        out["metrics"][metric] = {"mean": mean, "lo": lo, "hi": hi}
    for metric in PROBE_FIELDS:
        outcomes = [o for r in runs if r.get("probes") for o in probe_outcomes(r["probes"], metric)]
        if outcomes:
            k, n = int(sum(outcomes)), len(outcomes)
            lo, hi = wilson(k, n)
            out["pooled"][metric] = {"rate": k / n, "lo": lo, "hi": hi, "probes": n}
    return out


@dataclass(frozen=True)
class Verdict:
    """The best configuration against the runner-up on ``metric``: ``difference`` is best minus runner-up in the
    metric's better direction (positive: the best is better), with its interval over ``units``."""

    metric: str
    best: str
    runner_up: str
    difference: float
    lo: float
    hi: float
    units: str
    count: int

    @property
    def clear(self) -> bool:
        return self.lo > 0 or self.hi < 0

    @property
    def word(self) -> str:
        return CLEAR if self.clear else WITHIN_NOISE

    def figure(self, sign: float = 1.0) -> str:
        """The difference and its interval (``sign`` -1: seen from the runner-up's side)."""
        d, lo, hi = (sign * self.difference, sign * self.lo, sign * self.hi)
        lo, hi = min(lo, hi), max(lo, hi)
        if math.isnan(lo):  # one seed of a loss: no spread to size an interval with
            return f"{d:+.4f} (no interval: one seed)"
        if self.metric in PROBE_FIELDS:
            return f"{100 * d:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        return f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"

    def against_best(self) -> str:
        """The runner-up's side, for its row of the configurations table."""
        return f"vs best {self.figure(-1.0)} ({self.word.replace('_', ' ')})"

    def line(self) -> str:
        figure = self.figure()
        # The best ranks first by the selection rule, which puts the forgetting budget first: it can trail.
        verb = "beats" if self.difference >= 0 else "trails"
        return (
            f"verdict: {self.best} {verb} {self.runner_up} on {self.metric} by {figure} "
            f"({self.word.replace('_', ' ')}), 95% interval over {self.count} {self.units}"
        )


def compare(
    best: Sequence[dict[str, Any]],
    runner_up: Sequence[dict[str, Any]],
    *,
    metric: str,
    labels: tuple[str, str],
    seed: int = 0,
) -> Verdict:
    """``best`` against ``runner_up`` (their runs, as for ``summarize``) on ``metric``, paired by seed (and probe)."""
    sign = 1.0 if DIRECTIONS.get(metric, MAX) == MAX else -1.0
    theirs = {r["seed"]: r for r in runner_up}
    pairs = [(r, theirs[r["seed"]]) for r in best if r["seed"] in theirs]
    if not pairs:
        raise ValueError("the two configurations share no seed: nothing to pair")
    if metric in PROBE_FIELDS and all(a.get("probes") and b.get("probes") for a, b in pairs):
        rows = []
        for a, b in pairs:
            mine, other = probe_outcomes(a["probes"], metric), probe_outcomes(b["probes"], metric)
            if len(mine) != len(other) or (rows and len(mine) != len(rows[0])):
                raise ValueError(f"seed {a['seed']}: {len(mine)} probes against {len(other)}: not the same probes")
            rows.append([sign * (x - y) for x, y in zip(mine, other)])
        mean, lo, hi = crossed_bootstrap(rows, seed=seed)
        units, count = "(seed, probe) pairs", len(rows) * len(rows[0])
    else:
        diffs = [sign * (a["metrics"][metric] - b["metrics"][metric]) for a, b in pairs]
        mean, lo, hi = mean_interval(diffs)
        units, count = "seeds", len(diffs)
    return Verdict(metric, labels[0], labels[1], mean, lo, hi, units, count)


def crossed_bootstrap(
    differences: Sequence[Sequence[float]], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of a seeds x probes table of paired differences and its percentile interval from resampling seeds and
    probes at once (each resample: seeds with replacement, probes with replacement, the same probes for every
    seed, as every seed answers every probe).

    Resampling the (seed, probe) cells as if independent ignores that a seed moves all its probes together (seeds
    of one configuration differ by 10+ points here): on simulated A/A sweeps that called 15% of draws clear, this
    about 5%. scipy's bootstrap resamples one index per observation, not two crossed factors."""
    import numpy as np

    table = np.asarray(differences, dtype=float)
    mean = float(table.mean())
    if table.shape[0] < 2 and table.shape[1] < 2:
        return mean, math.nan, math.nan
    rng = np.random.default_rng(seed)
    s, p = table.shape
    rows = rng.integers(s, size=(resamples, s))
    cols = rng.integers(p, size=(resamples, p))
    # mean over the resampled grid = mean over chosen rows of (mean over chosen columns of that row)
    per_row = np.take_along_axis(table[rows], cols[:, None, :].repeat(s, axis=1), axis=2).mean(axis=2)
    stats = per_row.mean(axis=1)
    alpha = (1 - confidence) / 2
    return mean, float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def labels(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, str]:
    """Short names of two configurations by the keys whose values differ (``train.lr`` -> ``lr=5e-3``)."""
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)] or sorted(a)

    def name(c: dict[str, Any]) -> str:
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(c.get(k))}" for k in keys) or "(the base config)"

    return name(a), name(b)


def _short(value: Any) -> str:
    return str(value)  # Python's shortest round-trip form: 0.005, 1e-07, 0.005000005
