"""The Ray Train settings sftray starts every TorchTrainer with: the controller's poll interval, its preemption
watcher and Train's metrics.

Ray Train V2 reads them from environment variables (``ray/train/v2/_internal/constants.py``), in two processes:

- ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` and ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER``: the controller actor that
  ``fit()`` starts reads them when it is built. ``fit()`` hands the controller, as its runtime_env, the driver's
  value of every variable in Ray's ``ENV_VARS_TO_PROPAGATE`` that is set in the driver's ``os.environ``.
- ``RAY_TRAIN_METRICS_ENABLED``: the driver reads it in ``fit()`` when it assembles the controller's callbacks.

So setting them in the driver's ``os.environ`` before ``fit()`` reaches both; ``run_training`` does, in the process
that calls ``fit()`` (the CLI's, or a Tune trial's).
"""

from __future__ import annotations

import os

TRAIN_SETTINGS: dict[str, str] = {
    # Seconds between the controller's polls of the workers. A worker's checkpoint report and the end of the loop
    # wait for the next poll, so Ray's 2 s default adds up to 2 s per epoch and per run; a poll is one small RPC per
    # worker, so 5 per second cost nothing next to a training step.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # The watcher is one more actor per run that only logs node preemptions (of cloud spot instances): none here.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Train's Prometheus metrics callbacks time every report on the controller and workers; sftray tracks its own
    # metrics in MLflow.
    "RAY_TRAIN_METRICS_ENABLED": "0",
}
"""Environment variable -> sftray's value; a value the user set in the environment wins."""


def apply_train_settings(environ: os._Environ | dict[str, str] | None = None) -> dict[str, str]:
    """Sets every ``TRAIN_SETTINGS`` variable the environment (None: this process's, looked up at the call) does
    not set yet; returns those now in effect."""
    environ = os.environ if environ is None else environ
    for name, value in TRAIN_SETTINGS.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in TRAIN_SETTINGS}
