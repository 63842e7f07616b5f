"""The verdict on simulated sweeps: A/A (two configurations of equal quality) is called clear in about 5% of
draws, not more; a configuration clearly behind is called clear; configurations are summarised over seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sftray.eval.metrics import FORMAT_COMPLIANCE, VAL_LOSS
from sftray.eval.verdict import compare, configuration_key, labels, mean_interval, summarize

PROBES, SEEDS = 64, 3


def _runs(rng, difficulty, *, shift=0.0):
    """One configuration's runs: per seed, each probe complies with its own probability (plus ``shift``)."""
    runs = []
    for seed in range(SEEDS):
        p = np.clip(difficulty + shift + rng.normal(0, 0.05), 0, 1)  # a seed moves every probe a little
        table = [{"compliant": bool(c), "reference": None} for c in rng.random(PROBES) < p]
        rate = float(np.mean([r["compliant"] for r in table]))
        runs.append({"seed": seed, "metrics": {FORMAT_COMPLIANCE: rate}, "probes": table})
    return runs


def _best_first(a, b):
    """The sweep calls the configuration with the higher mean the best."""
    mean = lambda runs: np.mean([r["metrics"][FORMAT_COMPLIANCE] for r in runs])  # noqa: E731
    return (a, b) if mean(a) >= mean(b) else (b, a)


def test_aa_is_clear_in_about_five_percent_of_draws():
    rng = np.random.default_rng(0)
    draws, clear = 400, 0
    for i in range(draws):
        difficulty = rng.uniform(0.3, 0.95, size=PROBES)  # probes differ; both configurations face the same ones
        best, runner = _best_first(_runs(rng, difficulty), _runs(rng, difficulty))
        clear += compare(best, runner, metric=FORMAT_COMPLIANCE, labels=("a", "b"), seed=i).clear
    assert clear / draws <= 0.07  # ~5% expected (measured 3.25%); 400 draws: +-2 points


def test_a_configuration_clearly_behind_is_called_clear():
    rng = np.random.default_rng(1)
    difficulty = rng.uniform(0.3, 0.95, size=PROBES)
    verdict = compare(
        _runs(rng, difficulty, shift=0.0),
        _runs(rng, difficulty, shift=-0.3),
        metric=FORMAT_COMPLIANCE,
        labels=("lr=0.005", "lr=1e-07"),
    )
    assert verdict.clear and verdict.word == "clear" and 0.2 < verdict.difference < 0.4
    assert verdict.count == SEEDS * PROBES and verdict.units == "(seed, probe) pairs"
    line = verdict.line()
    assert line.startswith("verdict: lr=0.005 beats lr=1e-07 on eval/format_compliance by +") and "(clear)" in line


def test_a_loss_is_compared_over_seeds_in_its_direction():
    better = [{"seed": s, "metrics": {VAL_LOSS: 1.0 + 0.01 * s}} for s in range(3)]
    worse = [{"seed": s, "metrics": {VAL_LOSS: 1.5 + 0.02 * s}} for s in range(3)]
    verdict = compare(better, worse, metric=VAL_LOSS, labels=("a", "b"))
    assert verdict.difference == pytest.approx(0.51) and verdict.clear and verdict.units == "seeds"
    one_seed = compare(better[:1], worse[:1], metric=VAL_LOSS, labels=("a", "b"))
    assert math.isnan(one_seed.lo) and not one_seed.clear  # one seed: no interval, so no clear verdict
    # The rule ranks within the forgetting budget first: a best that is worse on the metric says so.
    trailing = compare(worse, better, metric=VAL_LOSS, labels=("b", "a"))
    assert trailing.difference < 0 and trailing.line().startswith("verdict: b trails a on val/loss by -0.51")
    with pytest.raises(ValueError, match="share no seed"):
        compare(better[:1], worse[1:], metric=VAL_LOSS, labels=("a", "b"))


def test_summaries_and_labels():
    rng = np.random.default_rng(2)
    runs = _runs(rng, np.full(PROBES, 0.8))
    summary = summarize(runs, metrics=[FORMAT_COMPLIANCE])
    m = summary["metrics"][FORMAT_COMPLIANCE]
    assert summary["seeds"] == [0, 1, 2] and m["lo"] < m["mean"] < m["hi"]
    pooled = summary["pooled"][FORMAT_COMPLIANCE]
    assert pooled["probes"] == SEEDS * PROBES and pooled["lo"] < pooled["rate"] < pooled["hi"]
    assert mean_interval([0.5])[0] == 0.5 and math.isnan(mean_interval([0.5])[1])
    key = configuration_key({"train.lr": 1e-3, "train.seed": 1}, seed_key="train.seed")
    assert key == configuration_key({"train.seed": 2, "train.lr": 1e-3}, seed_key="train.seed")
    assert labels({"train.lr": 5e-3, "train.epochs": 4}, {"train.lr": 2e-3, "train.epochs": 4}) == (
        "lr=0.005",
        "lr=0.002",
    )
