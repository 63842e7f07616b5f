"""The train recipe: prep (cached) -> base model (built on first use for the builtin) -> one Ray Train run, tracked
in MLflow."""

from __future__ import annotations

import time
from pathlib import Path

from sftray.config import Config
from sftray.layout import runs_dir
from sftray.models.loading import resolve_base_model_path
from sftray.recipes.prep import prep
from sftray.tracking import runs
from sftray.train.run import TrainOutcome, run_training


def run_name(cfg: Config) -> str:
    """A new run's folder name: data, method and start time."""
    return f"train-{cfg.data.name}-{cfg.train.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: Config, *, force: bool = False, name: str | None = None) -> TrainOutcome:
    """Trains once and picks the best checkpoint by eval; the run lives in ``<runs_dir>/<name>``
    (``sftray.layout.runs_dir``), tracked as an MLflow run in the ``train`` experiment (FAILED, or KILLED when
    interrupted, if it does not finish)."""
    prepared = prep(cfg, force=force)
    base = resolve_base_model_path(cfg.model, cache_dir=Path(cfg.paths.cache_dir))
    name = name or run_name(cfg)
    storage = runs_dir(cfg.paths.output_dir)
    run_id = runs.start_run(cfg, name=name, run_dir=storage / name, data_report=prepared.report)
    try:
        outcome = run_training(cfg, prepared=prepared, base_model=base, name=name, storage_path=str(storage))
    except BaseException as exc:
        runs.end_run(cfg, run_id=run_id, status="FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    runs.finish_run(cfg, run_id=run_id, outcome=outcome, data_report=prepared.report_path)
    return outcome
