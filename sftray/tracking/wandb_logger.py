"""Optional W&B logging of sweep trials, through Ray's own Tune callback (offline unless credentials exist)."""

from __future__ import annotations

import os
from typing import Any

from sftray.config import Config


def wandb_callback(cfg: Config) -> Any:
    """Ray's WandbLoggerCallback: one W&B run per trial, grouped by sweep; offline without WANDB_API_KEY."""
    from ray.air.integrations.wandb import WandbLoggerCallback

    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    # excludes: Tune's bookkeeping fields; the config is logged as W&B config, never secrets (none live there).
    return WandbLoggerCallback(
        project=cfg.tracking.wandb.project,
        group=cfg.sweep.name,
        excludes=["time_this_iter_s", "time_total_s", "timestamp", "pid", "hostname"],
    )
