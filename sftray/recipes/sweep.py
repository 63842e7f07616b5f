"""The sweep recipe: prep (cached) -> base model -> Tune trials, each running the trial body of
``sftray.recipes.trial`` (a Ray Train run or a stage chain), tracked in MLflow."""

from __future__ import annotations

import logging
from pathlib import Path

from sftray.config import Config, override
from sftray.layout import sweep_dir
from sftray.models.loading import resolve_base_model_path
from sftray.recipes.prep import prep
from sftray.recipes.trial import data_variants, run_trial
from sftray.tracking import mlflow_logger, trial_callbacks
from sftray.tune.sweep import SweepOutcome, run_sweep, search_space, table, with_every_trial

log = logging.getLogger("sftray.sweep")


def sweep(cfg: Config, *, callbacks: list | None = None) -> SweepOutcome:
    """Runs (or, with ``sweep.resume``, continues) the sweep. The MLflow parent run is closed when every trial
    has ended; an interrupted sweep leaves it open for the resume to finish. ``callbacks``: more Tune callbacks
    (the bench's timing)."""
    cfg = with_every_trial(cfg)  # what the trials train with: tracking, resources and trials all see it
    prepared = prep(cfg)
    variants = data_variants(cfg)
    for i, variant in enumerate(variants, 1):  # each trial then finds its data cached
        log.info("preparing the data of swept %s (%d of %d)", variant, i, len(variants))
        prep(_with(cfg, variant))
    base = resolve_base_model_path(cfg.model, cache_dir=Path(cfg.paths.cache_dir))
    folder = sweep_dir(cfg.paths.output_dir, cfg.sweep.name)
    parent = mlflow_logger.start_parent(cfg, space=search_space(cfg), data_report=prepared.report, sweep_dir=folder)
    callbacks = [*trial_callbacks(cfg, parent_id=parent, data_report=prepared.report), *(callbacks or [])]
    outcome = run_sweep(cfg, trial=run_trial, prepared=prepared, base_model=base, callbacks=callbacks)
    if not unfinished(outcome):
        mlflow_logger.finish_parent(
            cfg,
            parent_id=parent,
            best=outcome.best,
            table_text=table(outcome, cfg),
            verdict=outcome.verdict,
            configurations=[{k: c[k] for k in ("overrides", "summary")} for c in outcome.configurations],
        )
    return outcome


def _with(cfg: Config, overrides: dict) -> Config:
    for key, value in overrides.items():
        cfg = override(cfg, key, value)
    return cfg


def unfinished(outcome: SweepOutcome) -> list[dict]:
    """Trials that neither finished nor failed: Tune stopped them (Ctrl-C), and ``sweep.resume`` continues them."""
    return [r for r in outcome.trials if r["status"] == "stopped"]
