"""The train recipe: prep (cached) -> base model (built on first use for the builtin) -> one Ray Train run."""

from __future__ import annotations

import time
from pathlib import Path

from sftray.config import Config
from sftray.models.loading import resolve_base_model_path
from sftray.recipes.prep import prep
from sftray.train.run import TrainOutcome, run_training


def runs_dir(cfg: Config) -> Path:
    """Where training runs (and their epoch checkpoints) go: one folder per run below it."""
    return Path(cfg.paths.output_dir) / "runs"


def run_name(cfg: Config) -> str:
    """A new run's folder name: data, method and start time."""
    return f"train-{cfg.data.name}-{cfg.train.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: Config, *, force: bool = False, name: str | None = None) -> TrainOutcome:
    """Trains once and picks the best checkpoint by eval; the run lives in ``runs_dir(cfg) / name``."""
    prepared = prep(cfg, force=force)
    base = resolve_base_model_path(cfg.model, cache_dir=Path(cfg.paths.cache_dir))
    return run_training(
        cfg, prepared=prepared, base_model=base, name=name or run_name(cfg), storage_path=str(runs_dir(cfg))
    )
