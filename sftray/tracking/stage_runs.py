"""MLflow runs of a multi-stage chain: one run per chain, a child run per stage (from the driver only).

``sftray train stages=...`` logs a chain in the ``stages`` experiment; in a sweep the trial's run is the chain's run
and ``MlflowTrialLogger`` opens the stage runs below it (``stage_run``) as the stage's reports arrive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftray.config import Config, stage_config
from sftray.data.prepared import REPORT_FILE
from sftray.tracking.mlflow_logger import (
    BEST_NAMES,
    base_tags,
    experiment_id,
    flatten,
    is_metric_value,
    log_params,
    tracking_uri,
)
from sftray.tracking.runs import log_history, log_selected

EXPERIMENT = "stages"
"""The MLflow experiment of the chains ``sftray train`` runs (a sweep's chains live in the sweep's experiment)."""
RUN_ID_FILE = "mlflow_run_id"
"""In a chain folder: its MLflow run, reused when the chain resumes."""


def start_chain(cfg: Config, *, chain_dir: Path) -> str:
    """The chain's run (the one recorded in ``chain_dir`` when it resumes, RUNNING again); returns its run id."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    marker = Path(chain_dir) / RUN_ID_FILE
    if marker.is_file():
        run_id = marker.read_text().strip()
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(
        experiment_id(client, EXPERIMENT, uri=uri),
        run_name=Path(chain_dir).name,
        tags={**base_tags(cfg, data_report={}), "sftray.role": "chain", "chain_dir": str(chain_dir)},
    )
    log_params(client, run.info.run_id, flatten(cfg))
    Path(chain_dir).mkdir(parents=True, exist_ok=True)
    marker.write_text(run.info.run_id)
    return run.info.run_id


def stage_run(cfg: Config, *, parent_id: str, index: int) -> str:
    """The child run of stage ``index`` below ``parent_id`` (found again when it exists); returns its run id."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    parent = client.get_run(parent_id)
    name = cfg.stages[index].name
    existing = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.stage = '{index}'",
    )
    if existing:
        return existing[0].info.run_id
    run = client.create_run(
        parent.info.experiment_id,
        run_name=f"{index}-{name}",
        tags={"mlflow.parentRunId": parent_id, "sftray.role": "stage", "stage": str(index), "stage_name": name},
    )
    log_params(client, run.info.run_id, flatten(stage_config(cfg, index)))
    return run.info.run_id


def log_stage(cfg: Config, *, parent_id: str, record: dict[str, Any]) -> None:
    """A finished stage (a ``sftray.recipes.stages`` record): its child run with every eval's metrics (at its
    optimizer step in the stage) and what it selected (``runs.log_selected``); the chain run gets the stage's
    selected figures at step = index."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    index = record["index"]
    run_id = stage_run(cfg, parent_id=parent_id, index=index)
    log_history(client, run_id, record["history"])
    log_selected(
        client,
        run_id,
        cfg,
        best_checkpoint=record["best_checkpoint"],
        best_metrics=record["best_metrics"],
        reason=record["reason"],
        worse_than_base=bool(record.get("worse_than_base", False)),
        data_report=Path(record["data"]) / REPORT_FILE,
        run_path=record["run_path"],
    )
    for k, name in BEST_NAMES.items():
        if is_metric_value(record["best_metrics"].get(k)):
            client.log_metric(parent_id, f"{record['name']}/{name}", float(record["best_metrics"][k]), step=index)
    client.set_terminated(run_id, "FINISHED")


def finish_chain(cfg: Config, *, run_id: str, status: str = "FINISHED") -> None:
    """Ends the chain's run: FINISHED, FAILED or KILLED."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri(cfg)).set_terminated(run_id, status)
