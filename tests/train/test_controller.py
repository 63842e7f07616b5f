"""The Ray Train settings every TorchTrainer starts with: sftray's values, and the user's where they set one."""

from __future__ import annotations

from sftray.train.controller import TRAIN_SETTINGS, apply_train_settings


def test_unset_variables_take_sftrays_values():
    environ: dict[str, str] = {}
    assert apply_train_settings(environ) == TRAIN_SETTINGS
    assert environ == TRAIN_SETTINGS
    assert float(environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]) < 2.0  # below Ray's default poll


def test_a_value_the_user_set_wins():
    environ = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3", "RAY_TRAIN_METRICS_ENABLED": "1", "OTHER": "x"}
    in_effect = apply_train_settings(environ)
    assert in_effect["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
    assert in_effect["RAY_TRAIN_METRICS_ENABLED"] == "1"
    assert in_effect["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == TRAIN_SETTINGS["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"]
    assert environ["OTHER"] == "x"
