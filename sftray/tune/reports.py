"""The Train callback that carries a trial's reports to its Tune trial, kept free of heavy imports.

Ray Train pickles its RunConfig's callbacks to the controller and to every worker, and unpickling a callback imports
the module that defines it. This module imports ``ray.train`` alone: defined beside the sweep's code, the callback
made the controller import the sweep's modules (torch, transformers, the data pipeline) on every trial's path to its
first step.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback


class ReportsToQueue(UserCallback):
    """Train callback (runs in the Train controller): each rank-0 report, plus its checkpoint path, onto a queue."""

    def __init__(self, reports: Any) -> None:
        self.reports = reports

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        item = dict(metrics[0])
        if checkpoint is not None:
            item["checkpoint_path"] = checkpoint.path
        self.reports.put(item)
