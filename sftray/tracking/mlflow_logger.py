"""MLflow tracking of a sweep, from the Tune driver only (many writers would lock a SQLite store).

One experiment per sweep name; a parent run for the sweep (resolved config, search space, best trial) and a
child run per trial (flattened params, metrics per epoch, artifacts, tags). This module owns the store, the names
and the parent run; the Tune callback that writes the child runs is ``sftray.tracking.mlflow_callback``.
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

from sftray.config import SWEEP_POINT, Config
from sftray.eval.metrics import (
    EXACT_MATCH,
    FORGETTING,
    FORMAT_COMPLIANCE,
    PRETRAIN_LOSS,
    PROBE_METRICS,
    SCORE,
    VAL_LOSS,
    lower_bound,
    upper_bound,
)
from sftray.eval.outcome import OBJECTIVE, ROW_METRICS
from sftray.layout import mlflow_db

log = logging.getLogger("sftray.tracking")
SECRET_WORDS = ("token", "secret", "password", "api_key", "apikey", "credential")
"""Params whose key contains one of these are never logged."""
_URL_PASSWORD = re.compile(r"(://[^/:@\s]+):[^/@\s]+@")  # scheme://user:password@host
ARTIFACTS_DIRNAME = "mlartifacts"
"""Beside a SQLite store: the artifacts of the experiments sftray creates in it (``make mlflow-ui`` serves it too)."""


def tracking_uri(cfg: Config) -> str:
    """The configured URI, or the offline SQLite store in the output folder (absolute: Tune trials chdir)."""
    return cfg.tracking.uri or f"sqlite:///{mlflow_db(cfg.paths.output_dir)}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store (an absolute file: URI), so runs and their
    files stay together whatever the cwd (MLflow's default is ./mlruns); None for any other store (a server keeps
    its own artifact store)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / ARTIFACTS_DIRNAME).as_uri()


def experiment_id(client: Any, name: str, *, uri: str) -> str:
    """The id of the experiment ``name`` in the store at ``uri``, created (artifacts beside a SQLite store) if new."""
    experiment = client.get_experiment_by_name(name)
    return (
        experiment.experiment_id
        if experiment
        else client.create_experiment(name, artifact_location=artifact_location(uri))
    )


PARAMS_PER_BATCH = 100
"""MLflow's limit of params per ``log_batch`` call."""


def log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    """``params`` on the run in batches (one store transaction each, not one per param)."""
    from mlflow.entities import Param

    items = [Param(key, param_value(value)) for key, value in params.items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])


def is_metric_value(value: Any) -> bool:
    """A number MLflow can record as a metric (not a bool, not NaN or infinite)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def describe_domain(domain: Any) -> str:
    """A Tune search-space entry as people read it: ``grid_search([0.001, 0.005])``, ``choice([8, 16])``,
    ``loguniform(1e-05, 0.001)``."""
    if isinstance(domain, dict) and "grid_search" in domain:
        return f"grid_search({domain['grid_search']})"
    if hasattr(domain, "categories"):
        return f"choice({domain.categories})"
    if hasattr(domain, "lower") and hasattr(domain, "upper"):
        return f"{str(domain.sampler).lower()}({domain.lower}, {domain.upper})"
    return str(domain)


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


def trial_params(cfg: Config, trial_config: dict[str, Any]) -> dict[str, Any]:
    """A sweep trial's params, as MLflow and W&B both record them: the flattened config with the trial's own values
    (its ``sweep.points`` entry expanded) on top, flattened the same way (lists as JSON, secrets dropped)."""
    return {**flatten(cfg), **flatten(cfg.sweep.trial_overrides(trial_config))}


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
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    # A client of its own, not mlflow.set_tracking_uri: that exports MLFLOW_TRACKING_URI to the whole process and
    # its children (a later jobs/submit.py from the same process then logged to this sweep's store).
    client = MlflowClient(uri)
    marker = sweep_dir / "mlflow_parent_run_id"
    if cfg.sweep.resume and marker.is_file():
        return marker.read_text().strip()
    run = client.create_run(
        experiment_id(client, cfg.sweep.name, uri=uri),
        run_name=f"{cfg.sweep.name} (sweep)",
        tags={**base_tags(cfg, data_report=data_report), "sftray.role": "sweep"},
    )
    searched = {key: describe_domain(domain) for key, domain in space.items() if key != SWEEP_POINT}
    for key in dict.fromkeys(k for point in cfg.sweep.points for k in point):  # each key a point sets, in order
        searched[key] = f"sweep.points({[point.get(key) for point in cfg.sweep.points]})"
    # A swept key shows what its trials tried, not the base value none of them used.
    log_params(client, run.info.run_id, {**flatten(cfg), **searched})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
        (Path(tmp) / "search_space.json").write_text(json.dumps(searched, indent=1))
        (Path(tmp) / "data_report.json").write_text(json.dumps(data_report, indent=1, default=str))
        client.log_artifacts(run.info.run_id, tmp)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(run.info.run_id)
    return run.info.run_id


# Selected-epoch metrics of a trial -> the names its child run and the sweep's parent run carry them under (every
# metric eval.select_metric may name, so the report ranks trials by the sweep's rule).
BEST_NAMES = {
    SCORE: "best/score",
    FORMAT_COMPLIANCE: "best/format_compliance",
    EXACT_MATCH: "best/exact_match",
    **{bound(m): bound(f"best/{m.rsplit('/', 1)[-1]}") for m in PROBE_METRICS for bound in (lower_bound, upper_bound)},
    FORGETTING: "best/forgetting",
    PRETRAIN_LOSS: "best/pretrain_loss",
    VAL_LOSS: "best/val_loss",
    "epoch": "best/epoch",
}


WORSE_THAN_BASE = "selection/worse_than_base"
"""Tag of a trial's or stage's run: "true" when its selected checkpoint is worse than the model it started from on
eval.select_metric (``sftray.eval.metrics.select_best``), else "false"."""


def finish_parent(
    cfg: Config,
    *,
    parent_id: str,
    best: dict[str, Any] | None,
    table_text: str,
    verdict: Any = None,
    configurations: list[dict[str, Any]] | None = None,
) -> None:
    """Ends the parent run with the trial table, the best trial (a ``SweepOutcome.trials`` row, or None), the
    configurations over their seeds and the verdict (``sftray.eval.verdict.Verdict``: tag ``verdict`` clear or
    within_noise, metrics ``verdict/difference``, ``verdict/difference_lo``, ``verdict/difference_hi``)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    client.log_text(parent_id, table_text, "trials.txt")
    if configurations:
        client.log_text(parent_id, json.dumps(configurations, indent=1, default=str), "configurations.json")
    if verdict is not None:
        client.set_tag(parent_id, "verdict", verdict.word)
        client.set_tag(parent_id, "verdict_line", verdict.line()[:5000])
        for name, value in (("", verdict.difference), ("_lo", verdict.lo), ("_hi", verdict.hi)):
            if not math.isnan(value):
                client.log_metric(parent_id, f"verdict/difference{name}", float(value))
    if best:
        client.set_tag(parent_id, "best_trial", best["trial_id"])
        client.set_tag(parent_id, "best_checkpoint", best["checkpoint"] or "")
        client.log_text(
            parent_id,
            json.dumps({k: v for k, v in best.items() if k != "outcome"}, indent=1, default=str),
            "best_trial.json",
        )
        for column, metric in {"score": OBJECTIVE, **ROW_METRICS}.items():
            if isinstance(best.get(column), int | float):
                client.log_metric(parent_id, BEST_NAMES[metric], float(best[column]))
    client.set_terminated(parent_id, "FINISHED")


def param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text[:6000]  # MLflow's param value limit
