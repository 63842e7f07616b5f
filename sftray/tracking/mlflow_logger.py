"""MLflow tracking of a sweep, from the Tune driver only (many writers would lock a SQLite store).

One experiment per sweep name; a parent run for the sweep (resolved config, search space, best trial) and a
child run per trial (flattened params, metrics per epoch, artifacts, tags). The callback creates child runs as
trials start and logs each ``ray.train.report`` as it reaches Tune.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ray.tune import Callback

from sftray.config import Config

log = logging.getLogger("sftray.tracking")
SECRET_WORDS = ("token", "secret", "password", "api_key", "apikey", "credential")
"""Params whose key contains one of these are never logged."""
_URL_PASSWORD = re.compile(r"(://[^/:@\s]+):[^/@\s]+@")  # scheme://user:password@host


def tracking_uri(cfg: Config) -> str:
    """The configured URI, or the offline SQLite store in the output folder (absolute: Tune trials chdir)."""
    return cfg.tracking.uri or f"sqlite:///{Path(cfg.paths.output_dir).resolve() / 'mlflow.db'}"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dataclasses/dicts -> {"train.lora.r": 16, ...}; lists become JSON strings."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list | tuple) else value
    return {k: redact(v) for k, v in out.items() if not any(w in k.lower() for w in SECRET_WORDS)}


def redact(value: Any) -> Any:
    """Strings lose any password embedded in a URL (``http://user:***@host``); other values pass unchanged."""
    return _URL_PASSWORD.sub(r"\1:***@", value) if isinstance(value, str) else value


def git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def base_tags(cfg: Config, *, data_report: dict[str, Any]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        sftray_version = version("sftray")
    except PackageNotFoundError:
        sftray_version = "unknown"
    return {
        "git_commit": git_commit(),
        "sftray_version": sftray_version,
        "dataset_fingerprint": data_report.get("fingerprint", ""),
        "chat_template_hash": data_report.get("chat_template_hash", ""),
        "model": cfg.model.name_or_path,
        "method": cfg.train.method,
    }


def start_parent(cfg: Config, *, space: dict[str, Any], data_report: dict[str, Any], sweep_dir: Path) -> str:
    """The sweep's parent run (reused when the sweep resumes); returns its run id."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri(cfg))
    client = MlflowClient()
    experiment = client.get_experiment_by_name(cfg.sweep.name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.sweep.name)
    marker = sweep_dir / "mlflow_parent_run_id"
    if cfg.sweep.resume and marker.is_file():
        return marker.read_text().strip()
    run = client.create_run(
        experiment_id,
        run_name=f"{cfg.sweep.name} (sweep)",
        tags={**base_tags(cfg, data_report=data_report), "sftray.role": "sweep"},
    )
    for key, value in flatten(cfg).items():
        client.log_param(run.info.run_id, key, _param(value))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
        (Path(tmp) / "search_space.json").write_text(json.dumps({k: str(v) for k, v in space.items()}, indent=1))
        (Path(tmp) / "data_report.json").write_text(json.dumps(data_report, indent=1, default=str))
        client.log_artifacts(run.info.run_id, tmp)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(run.info.run_id)
    return run.info.run_id


# Selected-epoch metrics of a trial -> the names its child run and the sweep's parent run carry them under.
BEST_NAMES = {
    "eval/score": "best/score",
    "eval/format_compliance": "best/format_compliance",
    "eval/exact_match": "best/exact_match",
    "eval/forgetting": "best/forgetting",
    "val/loss": "best/val_loss",
    "epoch": "best/epoch",
}


def finish_parent(cfg: Config, *, parent_id: str, best: dict[str, Any] | None, table_text: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    client.log_text(parent_id, table_text, "trials.txt")
    if best:
        client.set_tag(parent_id, "best_trial", best["trial_id"])
        client.set_tag(parent_id, "best_checkpoint", best["checkpoint"] or "")
        client.log_text(
            parent_id,
            json.dumps({k: v for k, v in best.items() if k != "outcome"}, indent=1, default=str),
            "best_trial.json",
        )
        for key in ("score", "format_compliance", "exact_match", "forgetting", "val_loss"):
            if isinstance(best.get(key), int | float):
                client.log_metric(parent_id, f"best/{key}", float(best[key]))
    client.set_terminated(parent_id, "FINISHED")


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
            },
        )
        self.runs[trial.trial_id] = run.info.run_id
        params = flatten(self.cfg)
        params.update({k: v for k, v in (trial.config or {}).items()})
        for key, value in params.items():
            client.log_param(run.info.run_id, key, _param(value))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        from mlflow.entities import Metric

        step = int(result.get("step", result.get("epoch", 0)) or 0)
        ts = int(result.get("timestamp", 0) * 1000)
        metrics = [
            Metric(k, float(v), ts, step)
            for k, v in result.items()
            if "/" in k and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        ]
        metrics.append(Metric("epoch", float(result.get("epoch", 0)), ts, step))
        self._client().log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED")

    def _close(self, trial: Any, status: str) -> None:
        from sftray.tune.sweep import OUTCOME_FILE

        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        client = self._client()
        outcome_file = Path(trial.local_path or "") / OUTCOME_FILE if getattr(trial, "local_path", None) else None
        if outcome_file is not None and outcome_file.is_file():
            outcome = json.loads(outcome_file.read_text())
            client.set_tag(run_id, "best_checkpoint", outcome["best_checkpoint"])
            client.set_tag(run_id, "best_reason", outcome["reason"])
            # The selected epoch's figures under the parent's names, so runs compare on one column each.
            for key, value in (outcome.get("best_metrics") or {}).items():
                name = BEST_NAMES.get(key)
                if name and isinstance(value, int | float) and math.isfinite(value):
                    client.log_metric(run_id, name, float(value))
            client.log_text(run_id, json.dumps(dataclasses.asdict(self.cfg), indent=1, default=str), "config.json")
            client.log_text(run_id, json.dumps(trial.config, indent=1, default=str), "overrides.json")
            client.log_text(run_id, json.dumps(outcome, indent=1, default=str), "outcome.json")
            report = Path(outcome["data_report"])
            if report.is_file():
                client.log_artifact(run_id, str(report))
            best = Path(outcome["best_checkpoint"])
            for name in ("probes.json", "probes_base.json"):
                if (best / name).is_file():
                    client.log_artifact(run_id, str(best / name), artifact_path="generations")
        client.set_terminated(run_id, status)


def _param(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text[:6000]  # MLflow's param value limit
