"""The sweep's trial body: what one Tune trial runs (its data, a training run or a stage chain) and the outcome it
leaves in its trial folder for the sweep's table and tracking (``sftray.eval.outcome``)."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

from sftray.config import Config, override
from sftray.data.fingerprint import CONFIG_INPUTS
from sftray.data.prepared import REPORT_FILE, load_prepared
from sftray.eval.outcome import write_outcome
from sftray.layout import sweep_dir, trial_runs_dir
from sftray.recipes.prep import prep
from sftray.recipes.stages import run_stages
from sftray.train.run import run_training
from sftray.tune.session import TuneSession, runs_in_trial
from sftray.tune.sweep import TRIAL_DRIVER_CPUS
from sftray.tune.trial import current_trial, reporting_to_tune


def trial_prepares_own_data(overrides: dict[str, Any]) -> bool:
    """Whether a trial's overrides change its prepared data, so it prepares (or finds cached) its own."""
    return any(_data_key(key) for key in overrides)


def data_variants(cfg: Config) -> list[dict[str, Any]]:
    """The distinct data-changing overrides the sweep's trials can have (every combination of ``sweep.params`` and
    ``sweep.points``, grid or not: their values are lists either way), without the base data's (no overrides).
    ``sftray.recipes.sweep`` prepares each before the trials start: a trial that prepared its own while trials held
    every CPU would wait for one forever."""
    s = cfg.sweep
    axes = [[{key: value} for value in values] for key, values in s.params.items()]
    if s.points:
        axes.append([dict(point) for point in s.points])
    variants: dict[str, dict[str, Any]] = {}
    for combination in itertools.product(*axes):
        merged = {k: v for part in combination for k, v in part.items() if _data_key(k)}
        if merged:
            variants.setdefault(json.dumps(merged, sort_keys=True, default=str), merged)
    return list(variants.values())


def _data_key(key: str) -> bool:
    return key.split(".", 1)[0] in CONFIG_INPUTS


def run_trial(config: dict[str, Any], *, base_cfg: Config, prepared_dir: str, base_model: str) -> None:
    """One Tune trial (``config``: its sampled keys): apply them, train (one run or a chain, each a TorchTrainer;
    a one-worker run in this process), leave the outcome in the trial folder."""
    started_at = time.time()  # wall clock: the bench's per-trial start-up figure starts here
    cfg = base_cfg
    overrides = base_cfg.sweep.trial_overrides(config)
    for key, value in overrides.items():
        cfg = override(cfg, key, value)
    trial_id, trial_dir = current_trial(sweep_dir(base_cfg.paths.output_dir, base_cfg.sweep.name))
    name = f"{base_cfg.sweep.name}-{trial_id}"
    runs = trial_runs_dir(cfg.paths.output_dir, cfg.sweep.name)
    if cfg.stages:  # each stage prepares (or finds) its own data
        # A chain per trial, in a folder named by the trial: a resumed trial goes on from its last stage.
        stages = reporting_to_tune(
            lambda callbacks: run_stages(cfg, chain_dir=runs / name, base_model=base_model, callbacks=callbacks)
        )
        last = stages[-1]
        result = {k: last[k] for k in ("best_checkpoint", "best_metrics", "reason", "history", "run_path")}
        result["worse_than_base"] = last.get("worse_than_base", False)  # a chain recorded before it was kept
        result.update(stages=stages, data_report=str(Path(last["data"]) / REPORT_FILE))
    else:
        prepared = prep(cfg) if trial_prepares_own_data(overrides) else load_prepared(Path(prepared_dir))
        train = {"prepared": prepared, "base_model": base_model, "name": name, "storage_path": str(runs)}
        # The sweep sized this trial's resources for its base layout (sftray.tune.sweep.trial_resources).
        if runs_in_trial(base_cfg) and runs_in_trial(cfg):
            session = TuneSession(run_dir=runs / name, use_gpu=cfg.train.use_gpu)
            outcome = run_training(cfg, session=session, **train)
        else:
            outcome = reporting_to_tune(
                lambda callbacks: run_training(cfg, callbacks=callbacks, driver_cpus=TRIAL_DRIVER_CPUS, **train)
            )
        result = {
            "best_checkpoint": outcome.best_checkpoint,
            "best_metrics": outcome.best_metrics,
            "reason": outcome.best_reason,
            "worse_than_base": outcome.worse_than_base,
            "history": outcome.history,
            "run_path": outcome.path,
            "data_report": str(prepared.report_path),
        }
    write_outcome(trial_dir, {"overrides": overrides, **result, "started_at": started_at, "finished_at": time.time()})
