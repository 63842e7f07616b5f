"""Experiment tracking: MLflow (always) and W&B (optional), fed from the Tune driver."""

from __future__ import annotations

from typing import Any

from sftray.config import Config


def trial_callbacks(cfg: Config, *, parent_id: str, data_report: dict[str, Any]) -> list[Any]:
    """The Tune callbacks that record every trial: MLflow child runs under ``parent_id``, plus W&B when enabled."""
    # Deferred: the callback module imports Ray, and sftray.tracking's pure helpers must import without it.
    from sftray.tracking.mlflow_callback import MlflowTrialLogger
    from sftray.tracking.mlflow_logger import base_tags

    callbacks: list[Any] = [MlflowTrialLogger(cfg, parent_id=parent_id, tags=base_tags(cfg, data_report=data_report))]
    if cfg.tracking.wandb.enabled:
        from sftray.tracking.wandb_logger import wandb_callback  # deferred: W&B is optional

        callbacks.append(wandb_callback(cfg))
    return callbacks
