"""What the driver hands every Ray Train worker (``WorkerJob``) and Train's entry point, kept free of heavy imports.

Ray Train's controller unpickles the entry point and its config before any worker starts. Defined next to the loop,
they made the controller import the loop's modules too (transformers, pandas), delaying every run's and every
trial's start-up before the workers start. The worker imports the loop when the entry point runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sftray.config import Config
from sftray.eval.plan import EvalPlan


@dataclass(kw_only=True)
class WorkerJob:
    """Everything a worker needs, computed once by the driver (pickled to each worker)."""

    cfg: Config
    base_model: str
    """from_pretrained path of the base model."""
    tokenizer_dir: str
    """The tokenizer the data was prepared with."""
    rows_per_rank: int
    """Training rows each rank reads per epoch (the dataset is padded so every rank gets the same count)."""
    train_rows: Any = None
    """Object ref of the training rows (an Arrow table padded to a multiple of the workers)."""
    eval_rows: dict[str, Any] = field(default_factory=dict)
    """Object refs of the val and heldout rows (Arrow tables padded to a multiple of the workers)."""
    eval: EvalPlan = field(default_factory=EvalPlan)
    """The probes, their generation limit and the base-eval cache every eval uses (``sftray.eval.plan``)."""
    end_of_turn_id: int = 0
    user_opener: str = ""
    stage: int | None = None
    """Multi-stage: this stage's index, added to every report as ``stage``."""
    init_adapter: str | None = None
    """Multi-stage LoRA ``continue``: the earlier stage's adapter folder, trained on instead of a new adapter."""
    reference_pretrain_loss: float | None = None
    """Multi-stage: the original base model's held-out pretraining loss, so eval/forgetting of every stage is
    relative to it; None: relative to this run's own starting model (epoch 0)."""

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.rows_per_rank / self.cfg.train.micro_batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.cfg.train.grad_accum)


SETUP_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, ImportError)
"""Errors of building a worker's model (loading the base, a checkpoint or an adapter, applying LoRA) that the same
inputs raise again: the workers return them instead of failing, and the driver raises ``WorkerSetupError``, since
Ray Train retries every worker failure (``FailureConfig`` offers no exception filter). peft's
NoMatchingPeftModuleError is a ValueError; out of memory (a RuntimeError) and lost connections are not here."""


class WorkerSetupError(ValueError):
    """The workers could not build their model, and would fail the same way again (not retried)."""


def check_setup(return_value: Any) -> None:
    """Raises ``WorkerSetupError`` when a run's return value is the workers' setup errors (``SETUP_ERRORS``)."""
    if isinstance(return_value, dict) and return_value.get("setup_errors"):
        raise WorkerSetupError(
            "training could not start, and would fail the same way again (not retried): "
            + "; ".join(return_value["setup_errors"])
        )


def train_fn_per_worker(config: dict[str, Any]) -> list[dict[str, Any]] | dict[str, list[str]]:
    """Ray Train entry point (``config["job"]``: the ``WorkerJob``); returns (on rank 0) the run's metric history, or
    ``{"setup_errors": [...]}`` when the workers could not build their model (``check_setup``)."""
    from sftray.train.loop import run_worker

    _quiet_report_log()
    return run_worker(config["job"])


def _quiet_report_log() -> None:
    """Ray Train logs every ``ray.train.report`` of every rank with its whole metrics dict at INFO; the driver prints
    one table per run instead. Its logger is named by its file's path, not by module."""
    import logging
    from pathlib import Path

    import ray.train.v2

    context = Path(ray.train.v2.__file__).parent / "_internal" / "execution" / "context.py"
    logging.getLogger(str(context)).setLevel(logging.WARNING)
