"""What every sftray MLflow run records, whichever path made it (a single ``sftray train``, a stage of a chain, a
sweep trial), and the single run's own run (from the driver only).

A run gets its reports' metrics at their optimizer step (``train/loss`` at each of an epoch's loss points), and when
it ends the selected checkpoint: its figures (``best/*``), why, the data report, the generation tables and its
model folders per ``tracking.log_model`` (``model/``: the LoRA adapter or the full weights, with the tokenizer;
``merged/`` when exported), so ``mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model")`` is a folder plain
transformers/peft load. ``sftray train`` logs a single run in the ``train`` experiment.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from sftray.config import Config
from sftray.eval.metrics import TRAIN_LOSS, TRAIN_LOSS_POINTS
from sftray.layout import EPOCH_GLOB
from sftray.tracking.mlflow_logger import (
    BEST_NAMES,
    WORSE_THAN_BASE,
    base_tags,
    experiment_id,
    flatten,
    is_metric_value,
    log,
    log_params,
    redact,
    tracking_uri,
)

EXPERIMENT = "train"
"""The MLflow experiment of the single runs ``sftray train`` runs (chains: ``stages``; sweeps: the sweep's name)."""
METRICS_PER_BATCH = 500
"""Metrics per ``log_batch`` call (MLflow's limit is 1000)."""
GENERATION_TABLES = ("probes.json", "probes_base.json")
"""The selected checkpoint's generation tables, logged below ``generations/``."""
MODEL_FOLDERS = ("model", "merged")
"""A checkpoint's loadable model folders (``sftray.train.checkpoint``), logged under the same names."""


def report_metrics(report: dict[str, Any], *, timestamp_ms: int = 0) -> list[Any]:
    """One report's (or history row's) metrics at its optimizer step; an epoch's ``train/loss`` at each of its
    loss points instead of once."""
    from mlflow.entities import Metric

    step = int(report.get("step", report.get("epoch", 0)) or 0)
    points = report.get(TRAIN_LOSS_POINTS) or []
    metrics = [
        Metric(key, float(value), timestamp_ms, step)
        for key, value in report.items()
        if "/" in key and is_metric_value(value) and not (points and key == TRAIN_LOSS)
    ]
    metrics += [Metric(TRAIN_LOSS, float(loss), timestamp_ms, int(s)) for s, loss in points if is_metric_value(loss)]
    if "epoch" in report:
        metrics.append(Metric("epoch", float(report["epoch"]), timestamp_ms, step))
    return metrics


def log_metrics(client: Any, run_id: str, metrics: list[Any]) -> None:
    for start in range(0, len(metrics), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + METRICS_PER_BATCH])


def log_history(client: Any, run_id: str, history: list[dict[str, Any]]) -> None:
    """Every eval of a finished run (``TrainOutcome.history``) at its step."""
    log_metrics(client, run_id, [m for row in history for m in report_metrics(row)])


def log_selected(
    client: Any,
    run_id: str,
    cfg: Config,
    *,
    best_checkpoint: str,
    best_metrics: dict[str, Any],
    reason: str,
    worse_than_base: bool,
    data_report: str | Path | None,
    run_path: str | Path | None,
) -> None:
    """What a finished run selected: the checkpoint (tag), why, whether it is worse than the model the run started
    from on the selection metric, its figures as ``best/*``, the data report, its generation tables and model folders
    (``log_models``)."""
    client.set_tag(run_id, "best_checkpoint", best_checkpoint)
    client.set_tag(run_id, "best_reason", reason)
    client.set_tag(run_id, WORSE_THAN_BASE, str(worse_than_base).lower())
    # The selected epoch's figures under the sweep parent's names, so runs compare on one column each.
    for key, value in best_metrics.items():
        name = BEST_NAMES.get(key)
        if name and is_metric_value(value):
            client.log_metric(run_id, name, float(value))
    if data_report and Path(data_report).is_file():
        client.log_artifact(run_id, str(data_report))
    best = Path(best_checkpoint)
    for name in GENERATION_TABLES:
        if (best / name).is_file():
            client.log_artifact(run_id, str(best / name), artifact_path="generations")
    log_models(client, run_id, cfg, best_checkpoint=best, run_path=run_path)


def log_models(client: Any, run_id: str, cfg: Config, *, best_checkpoint: Path, run_path: str | Path | None) -> None:
    """Per ``tracking.log_model``: the selected checkpoint's model folders (``model/``, ``merged/``), with ``all``
    also every epoch checkpoint's of the run under ``checkpoints/epoch_NN/``."""
    mode = cfg.tracking.log_model
    if mode == "none":
        return
    _log_model_folders(client, run_id, best_checkpoint, prefix="")
    if mode == "all" and run_path:
        for checkpoint in sorted(Path(run_path).glob(EPOCH_GLOB)):
            _log_model_folders(client, run_id, checkpoint, prefix=f"checkpoints/{checkpoint.name}/")


def _log_model_folders(client: Any, run_id: str, checkpoint: Path, *, prefix: str) -> None:
    for name in MODEL_FOLDERS:
        if (checkpoint / name).is_dir():
            client.log_artifacts(run_id, str(checkpoint / name), artifact_path=f"{prefix}{name}")


# --- a single run -----------------------------------------------------------------------------------------------


def start_run(cfg: Config, *, name: str, run_dir: Path, data_report: dict[str, Any]) -> str:
    """A single run's MLflow run (params, tags, config); returns its run id."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    run = client.create_run(
        experiment_id(client, EXPERIMENT, uri=uri),
        run_name=name,
        tags={**base_tags(cfg, data_report=data_report), "sftray.role": "train", "run_dir": str(run_dir)},
    )
    log_params(client, run.info.run_id, flatten(cfg))
    client.log_text(run.info.run_id, json.dumps(dataclasses.asdict(cfg), indent=1, default=str), "config.json")
    log.info("tracked as MLflow run %s in experiment %r at %s", run.info.run_id, EXPERIMENT, redact(uri))
    return run.info.run_id


def finish_run(cfg: Config, *, run_id: str, outcome: Any, data_report: Path) -> None:
    """A finished single run (a ``TrainOutcome``): every eval, the selected checkpoint, FINISHED."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    log_history(client, run_id, outcome.history)
    log_selected(
        client,
        run_id,
        cfg,
        best_checkpoint=outcome.best_checkpoint,
        best_metrics=outcome.best_metrics,
        reason=outcome.best_reason,
        worse_than_base=outcome.worse_than_base,
        data_report=data_report,
        run_path=outcome.path,
    )
    client.set_terminated(run_id, "FINISHED")


def end_run(cfg: Config, *, run_id: str, status: str) -> None:
    """Ends a run that did not finish: ``FAILED``, or ``KILLED`` when it was interrupted."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri(cfg)).set_terminated(run_id, status)
