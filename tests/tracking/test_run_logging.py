"""What every run logs, in a real SQLite MLflow store without Ray: train/loss at each of an epoch report's points,
the default spacing of those points (``tracking.log_every_steps``); the knobs' checks are in tests/test_config.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from mlflow import MlflowClient

from sftray.config import compose_config
from sftray.eval.metrics import TRAIN_LOSS, TRAIN_LOSS_POINTS
from sftray.tracking.mlflow_callback import MlflowTrialLogger
from sftray.tracking.mlflow_logger import base_tags, start_parent, tracking_uri
from sftray.tune.sweep import search_space

CONF = Path(__file__).resolve().parents[2] / "conf"


def _cfg(tmp_path: Path, *overrides: str):
    return compose_config([f"paths.output_dir={tmp_path / 'out'}", "sweep.name=points", *overrides], conf=CONF)


def test_loss_points_default_to_a_handful_per_epoch(tmp_path: Path) -> None:
    tracking = _cfg(tmp_path).tracking
    assert [tracking.loss_every_steps(n) for n in (1, 4, 12, 100)] == [1, 1, 3, 20]
    assert _cfg(tmp_path, "tracking.log_every_steps=7").tracking.loss_every_steps(100) == 7


def _trial(tmp_path: Path, cfg, trial_id: str = "t_00000") -> tuple[MlflowTrialLogger, SimpleNamespace]:
    parent = start_parent(cfg, space=search_space(cfg), data_report={}, sweep_dir=tmp_path / "sweep")
    logger = MlflowTrialLogger(cfg, parent_id=parent, tags=base_tags(cfg, data_report={}))
    trial = SimpleNamespace(trial_id=trial_id, config={}, path=str(tmp_path / trial_id))
    logger.on_trial_start(0, [], trial)
    return logger, trial


def test_an_epoch_reports_train_loss_at_each_of_its_points(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    logger, trial = _trial(tmp_path, cfg)
    logger.on_trial_result(0, [], trial, {"epoch": 0, "step": 0, "val/loss": 4.0})
    for epoch, points in ((1, [[3, 3.0], [6, 2.6]]), (2, [[9, 2.4], [12, 2.2]])):
        report = {"epoch": epoch, "step": 6 * epoch, "val/loss": 4.0 - epoch, TRAIN_LOSS: points[-1][1] + 0.1}
        logger.on_trial_result(0, [], trial, {**report, TRAIN_LOSS_POINTS: points})
    client = MlflowClient(tracking_uri(cfg))
    history = sorted(client.get_metric_history(logger.runs[trial.trial_id], TRAIN_LOSS), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(3, 3.0), (6, 2.6), (9, 2.4), (12, 2.2)]
    val = client.get_metric_history(logger.runs[trial.trial_id], "val/loss")
    assert sorted(m.step for m in val) == [0, 6, 12]
