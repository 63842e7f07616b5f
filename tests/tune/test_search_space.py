"""The sweep's search space from config (no Ray running): axes, sweep.points, and the errors a typo gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftray.config import SWEEP_POINT, compose_config
from sftray.tune.sweep import search_space

CONF = Path(__file__).resolve().parents[2] / "conf"


def _cfg(*overrides: str):
    return compose_config(list(overrides), conf=CONF, base=Path("/tmp"))


def _grid(domain) -> list:
    return domain["grid_search"]


def test_the_forgetting_sweep_is_method_by_mix_ratio_with_each_method_at_its_own_lr():
    cfg = _cfg("sweep=forgetting")
    space = search_space(cfg)
    assert set(space) == {"mix.ratio", "train.epochs", SWEEP_POINT}  # no LR axis: each point sets its LR
    assert _grid(space["mix.ratio"]) == [0.0, 0.05, 0.2]
    points = [cfg.sweep.trial_overrides({SWEEP_POINT: i}) for i in _grid(space[SWEEP_POINT])]
    assert [p["train.method"] for p in points] == ["lora", "full"]
    assert all(p["train.lr"] > 0 for p in points) and points[0]["train.lr"] != points[1]["train.lr"]


def test_trial_overrides_expand_the_point_and_keep_the_other_keys():
    cfg = _cfg("sweep.lr.values=[]", "sweep.points=[{train.lr: 1e-3, train.lora.r: 4}, {train.lr: 3e-3}]")
    assert cfg.sweep.trial_overrides({SWEEP_POINT: 0, "train.epochs": 2}) == {
        "train.lr": 1e-3,
        "train.lora.r": 4,
        "train.epochs": 2,
    }
    assert cfg.sweep.trial_overrides({"train.epochs": 2}) == {"train.epochs": 2}  # a sweep without points


def test_a_point_key_also_swept_on_its_own_axis_is_an_error_that_says_how_to_fix_it():
    cfg = _cfg("sweep.points=[{train.method: full, train.lr: 1e-3}]")  # sweep.lr.values is still the default grid
    with pytest.raises(ValueError, match=r"sweep.points\[0\] sets train.lr.*sweep.lr.values=\[\]"):
        search_space(cfg)


def test_a_typo_in_a_point_key_lists_the_valid_keys():
    cfg = _cfg("sweep.lr.values=[]", "sweep.points=[{train.lrr: 1e-3}]")
    with pytest.raises(Exception, match=r"lrr.*(valid|lr)"):
        search_space(cfg)


def test_an_empty_point_is_a_config_error():
    with pytest.raises(Exception, match=r"sweep.points\[1\] sets no key"):
        _cfg("sweep.lr.values=[]", "sweep.points=[{train.lr: 1e-3}, {}]")


def test_no_lr_values_and_half_a_range_is_an_error_but_neither_keeps_train_lr():
    assert "train.lr" not in search_space(_cfg("sweep.lr.values=[]"))
    with pytest.raises(Exception, match="both low and high, or neither"):
        _cfg("sweep.lr.values=[]", "sweep.lr.low=1e-4")
