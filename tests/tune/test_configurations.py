"""A sweep's configurations from its trial rows (no Ray): grouped without the seed, ranked on their means, and a
sweep whose two configurations finished on different seeds still ends with its table and says why there is no
verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftray.config import SEED_KEY, compose_config
from sftray.eval.metrics import FORGETTING, FORMAT_COMPLIANCE, SCORE, VAL_LOSS
from sftray.tune.configurations import group, rank_configurations, table

CONF = Path(__file__).resolve().parents[2] / "conf"


def _row(lr: float, seed: int, compliance: float) -> dict:
    metrics = {FORMAT_COMPLIANCE: compliance, SCORE: compliance, FORGETTING: 0.01, VAL_LOSS: 2.0, "epoch": 1}
    return {
        "trial_id": f"t{lr}-{seed}",
        "status": "finished",
        "score": compliance,
        "overrides": {"train.lr": lr, SEED_KEY: seed},
        "outcome": {"best_metrics": metrics},
        "checkpoint": None,  # no probe table: a probe rate is then compared over seeds
    }


def test_configurations_group_by_every_key_but_the_seed_and_rank_on_means():
    cfg = compose_config([], conf=CONF)
    rows = [_row(1e-3, 0, 0.5), _row(5e-3, 0, 0.9), _row(1e-3, 1, 0.6), _row(5e-3, 1, 0.8)]
    assert [len(c["trials"]) for c in group(rows, cfg)] == [2, 2]
    configs, reason, verdict, note = rank_configurations(rows, cfg)
    assert [c["overrides"] for c in configs] == [{"train.lr": 5e-3}, {"train.lr": 1e-3}]
    assert verdict is not None and verdict.units == "seeds" and verdict.difference == pytest.approx(0.3) and not note
    assert "train.lr=0.005  seeds [0, 1]" in table(configs, cfg) and "highest" in reason


def test_configurations_on_different_seeds_end_without_a_verdict_but_with_their_table():
    cfg = compose_config([], conf=CONF)
    configs, _, verdict, note = rank_configurations([_row(1e-3, 0, 0.5), _row(5e-3, 1, 0.9)], cfg)
    assert verdict is None and note == "no verdict: the two configurations share no seed: nothing to pair"
    assert len(configs) == 2 and "train.lr=0.001" in table(configs, cfg)
