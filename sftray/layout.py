"""The output folder's layout: the one home of every folder and file name sftray writes under ``paths.output_dir``.

```
<paths.output_dir>/
  data/<data.name>-<fingerprint[:12]>/   prepared data (Parquet) and its report, reused by fingerprint
  runs/<run name>/epoch_NN/              `sftray train` runs, one checkpoint per epoch
  sweeps/<sweep.name>/                   Ray Tune's experiment folder (Tune's storage is sweeps/), with the sweep's report
  sweeps/runs/<sweep.name>/<trial>/      each trial's Train run, with its epoch checkpoints
  base_eval/<key>.json                   cached evals of base models, shared by runs and trials
  mlflow.db                              the default MLflow store (when tracking.uri is unset)
```
A layer reads these names only through this module (it sits beside ``config``, below every other layer).
"""

from __future__ import annotations

from pathlib import Path

PREPARED_DIR = "data"
RUNS_DIR = "runs"
SWEEPS_DIR = "sweeps"
BASE_EVAL_DIR = "base_eval"
MLFLOW_DB = "mlflow.db"
EPOCH_GLOB = "epoch_*"
"""Matches every epoch checkpoint folder that ``epoch_dir_name`` makes."""


def epoch_dir_name(epoch: int) -> str:
    """An epoch checkpoint's folder name: ``epoch_01`` (zero-padded, so folders sort by epoch)."""
    return f"epoch_{epoch:02d}"


def prepared_dir(output_dir: str | Path, *, name: str, fingerprint: str) -> Path:
    """Where prepared data with this fingerprint lives (the first 12 hex digits name it)."""
    return Path(output_dir) / PREPARED_DIR / f"{name}-{fingerprint[:12]}"


def runs_dir(output_dir: str | Path) -> Path:
    """Where `sftray train` runs go: one folder per run below it."""
    return Path(output_dir) / RUNS_DIR


def sweeps_dir(output_dir: str | Path) -> Path:
    """Ray Tune's storage for every sweep (Tune makes one experiment folder per sweep below it)."""
    return Path(output_dir) / SWEEPS_DIR


def sweep_dir(output_dir: str | Path, name: str) -> Path:
    """A sweep's Tune experiment folder; sftray's sweep files (report) sit in it beside Tune's."""
    return sweeps_dir(output_dir) / name


def trial_runs_dir(output_dir: str | Path, name: str) -> Path:
    """Where a sweep's trials keep their Train runs and checkpoints: one folder per trial below it."""
    return sweeps_dir(output_dir) / RUNS_DIR / name


def base_eval_dir(output_dir: str | Path) -> Path:
    """The base-model eval cache (``sftray.eval.base_eval``)."""
    return Path(output_dir) / BASE_EVAL_DIR


def mlflow_db(output_dir: str | Path) -> Path:
    """The default MLflow store, a SQLite file."""
    return Path(output_dir).resolve() / MLFLOW_DB
