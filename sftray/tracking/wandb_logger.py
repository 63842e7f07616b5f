"""Optional W&B logging of sweep trials, through Ray's own Tune callback (offline unless credentials exist)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sftray.config import Config
from sftray.eval.metrics import TRAIN_LOSS_POINTS
from sftray.tracking.mlflow_logger import trial_params

# Tune's bookkeeping fields, and an epoch's list of train/loss points: not metrics.
EXCLUDES = ["time_this_iter_s", "time_total_s", "timestamp", "pid", "hostname", "node_ip", "date", TRAIN_LOSS_POINTS]


def wandb_mode() -> str:
    """online with credentials (WANDB_API_KEY or a `wandb login` entry in ~/.netrc), else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    return "online" if os.environ.get("WANDB_API_KEY") or logged_in else "offline"


def wandb_callback(cfg: Config) -> Any:
    """Ray's WandbLoggerCallback: one W&B run per trial, grouped by sweep, configured like its MLflow child run.

    Each run's config is the flattened sftray config (dotted keys, secrets dropped, URL passwords masked) with the
    trial's sampled values on top, the same params MLflow gets. Mode and folder go to ``wandb.init`` directly: the
    logging actors Ray starts do not inherit this process's environment.
    """
    from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

    class _FlushingActor(_WandbLoggingActor):
        def run(self) -> None:
            super().run()
            # wandb.finish() can return before wandb-core has written the run's file, and Ray kills this actor as
            # soon as run() returns: a trial ending last in a sweep then left a 7-byte offline run (no config, no
            # metrics; seen in the sweep test's debug logs). teardown() waits for the core to finish its streams.
            self._wandb.teardown()

    class _Callback(WandbLoggerCallback):
        _logger_actor_cls = _FlushingActor

        def log_trial_start(self, trial: Any) -> None:
            # Ray passes self.kwargs to wandb.init after its own arguments, so this config wins for this trial.
            self.kwargs["config"] = trial_params(cfg, dict(trial.config or {}))
            super().log_trial_start(trial)

    folder = Path(cfg.paths.output_dir).resolve()  # W&B adds its own wandb/ below
    folder.mkdir(parents=True, exist_ok=True)
    return _Callback(
        project=cfg.tracking.wandb.project,
        group=cfg.sweep.name,
        excludes=EXCLUDES,
        mode=wandb_mode(),
        dir=str(folder),
    )
