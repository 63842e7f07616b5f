"""The Tune callback that records each trial as an MLflow child run of the sweep's parent run.

It creates the child run as a trial starts (flattened params with the trial's sampled values on top), logs each
``ray.train.report`` as it reaches Tune, and when the trial ends its selected epoch's metrics (``best/*``), outcome,
config and generation tables.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ray.tune import Callback

from sftray.config import SEED_KEY, Config, override
from sftray.eval.outcome import OUTCOME_FILE, read_outcome
from sftray.eval.verdict import configuration_key
from sftray.tracking.mlflow_logger import log_params, tracking_uri, trial_params
from sftray.tracking.runs import log_selected, report_metrics
from sftray.tracking.stage_runs import stage_run


class MlflowTrialLogger(Callback):
    """Tune callback: one MLflow child run per trial, metrics as results arrive, artifacts when it ends."""

    def __init__(self, cfg: Config, *, parent_id: str, tags: dict[str, str]) -> None:
        self.cfg, self.parent_id, self.tags = cfg, parent_id, tags
        self.runs: dict[str, str] = {}

    def _client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri(self.cfg))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        client = self._client()
        parent = client.get_run(self.parent_id)
        existing = client.search_runs([parent.info.experiment_id], filter_string=f"tags.trial_id = '{trial.trial_id}'")
        if existing:  # a resumed sweep restarting an unfinished trial
            self.runs[trial.trial_id] = existing[0].info.run_id
            return
        run = client.create_run(
            parent.info.experiment_id,
            run_name=f"trial {trial.trial_id}",
            tags={
                **self.tags,
                "mlflow.parentRunId": self.parent_id,
                "trial_id": trial.trial_id,
                "sftray.role": "trial",
                # the replicate seed and the configuration it replicates (every swept key but the seed)
                "seed": str((trial.config or {}).get(SEED_KEY, "")),
                "configuration": configuration_key(
                    self.cfg.sweep.trial_overrides(dict(trial.config or {})), seed_key=SEED_KEY
                )[:5000],
            },
        )
        self.runs[trial.trial_id] = run.info.run_id
        log_params(client, run.info.run_id, trial_params(self.cfg, dict(trial.config or {})))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        metrics = report_metrics({"epoch": 0, **result}, timestamp_ms=int(result.get("timestamp", 0) * 1000))
        if result.get("stage") is not None:
            # A multi-stage trial: the trial's run is the chain's, each stage's reports go to its own child run
            # (steps restart in every stage).
            run_id = self._stage_run(trial, run_id, int(result["stage"]))
        self._client().log_batch(run_id, metrics=metrics)

    def _stage_run(self, trial: Any, trial_run_id: str, index: int) -> str:
        key = f"{trial.trial_id}/stage{index}"
        if key not in self.runs:
            cfg = self.cfg
            for name, value in self.cfg.sweep.trial_overrides(dict(trial.config or {})).items():
                cfg = override(cfg, name, value)
            self.runs[key] = stage_run(cfg, parent_id=trial_run_id, index=index)
        return self.runs[key]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED")

    def _close(self, trial: Any, status: str) -> None:

        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        client = self._client()
        # The trial folder in the sweep's storage, where the trial body writes its outcome (sftray.tune.trial):
        # Tune's local_path is a staging folder under the Ray session that it syncs to storage later.
        trial_dir = getattr(trial, "path", None)
        outcome = read_outcome(trial_dir) if trial_dir else None
        if outcome is not None:
            client.log_text(run_id, json.dumps(dataclasses.asdict(self.cfg), indent=1, default=str), "config.json")
            overrides = self.cfg.sweep.trial_overrides(dict(trial.config or {}))
            client.log_text(run_id, json.dumps(overrides, indent=1, default=str), "overrides.json")
            client.log_text(run_id, json.dumps(outcome, indent=1, default=str), OUTCOME_FILE)
            log_selected(
                client,
                run_id,
                self.cfg,
                best_checkpoint=outcome["best_checkpoint"],
                best_metrics=outcome.get("best_metrics") or {},
                reason=outcome["reason"],
                worse_than_base=bool(outcome.get("worse_than_base", False)),
                data_report=outcome.get("data_report"),
                run_path=outcome.get("run_path"),
            )
        client.set_terminated(run_id, status)
        for key in [k for k in self.runs if k.startswith(f"{trial.trial_id}/stage")]:
            client.set_terminated(self.runs.pop(key), status)
