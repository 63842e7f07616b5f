"""The tracking schema: where runs are recorded (MLflow, optionally W&B), which model files and loss points."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sftray.config.checks import in_range, one_of

LOG_MODEL = ("best", "none", "all")
LOSS_POINTS_PER_EPOCH = 5
"""``train/loss`` points per epoch in tracking unless ``tracking.log_every_steps`` is set."""


@dataclass(kw_only=True)
class WandbConfig:
    """Weights & Biases, besides MLflow."""

    enabled: bool = False
    """Also log every trial to W&B (offline unless WANDB_API_KEY is set)."""
    project: str = "sftray"
    """W&B project."""


@dataclass(kw_only=True)
class TrackingConfig:
    """Where runs are recorded."""

    uri: str | None = None
    """MLflow tracking URI; None: sqlite:///<paths.output_dir>/mlflow.db (offline, no server)."""
    log_model: str = "best"
    """Model folders each run (single, stage, trial) logs as MLflow artifacts: ``best``: the selected checkpoint's
    ``model/`` (the LoRA adapter, or full weights; with its tokenizer) and ``merged/`` when exported; ``all``: also
    every epoch's under ``checkpoints/epoch_NN/``; ``none``: no weights (large models), the local path in the
    ``best_checkpoint`` tag only."""
    log_every_steps: int | None = None
    """A ``train/loss`` point every N optimizer steps (the loss over those steps); None: about
    ``LOSS_POINTS_PER_EPOCH`` per epoch."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Optional W&B logging."""

    def __post_init__(self) -> None:
        one_of("tracking.log_model", self.log_model, LOG_MODEL)
        in_range("tracking.log_every_steps", self.log_every_steps, ge=1)

    def loss_every_steps(self, steps_per_epoch: int) -> int:
        """The optimizer steps between two ``train/loss`` points of a run with ``steps_per_epoch``."""
        return self.log_every_steps or max(1, math.ceil(steps_per_epoch / LOSS_POINTS_PER_EPOCH))
