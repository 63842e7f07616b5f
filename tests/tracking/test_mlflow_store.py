"""The sweep's parent run in a real SQLite MLflow store: where its artifacts land, and the params it records."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow import MlflowClient

from sftray.config import compose_config
from sftray.eval.metrics import DIRECTIONS, SCORE
from sftray.tracking.mlflow_logger import BEST_NAMES, artifact_location, start_parent, tracking_uri
from sftray.tune.sweep import search_space

CONF = Path(__file__).resolve().parents[2] / "conf"


def _parent(tmp_path: Path, overrides: list[str]) -> tuple[MlflowClient, str, Path]:
    out = tmp_path / "out"
    cfg = compose_config([f"paths.output_dir={out}", "sweep.name=store", *overrides], conf=CONF, base=tmp_path)
    parent = start_parent(cfg, space=search_space(cfg), data_report={"fingerprint": "f"}, sweep_dir=out / "sweeps")
    return MlflowClient(tracking_uri(cfg)), parent, out


def test_sqlite_store_keeps_artifacts_beside_it_whatever_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    client, parent, out = _parent(tmp_path, [])
    run = client.get_run(parent)
    artifacts = Path(urlparse(run.info.artifact_uri).path)
    assert urlparse(run.info.artifact_uri).scheme == "file"
    assert artifacts.is_relative_to(out / "mlartifacts"), run.info.artifact_uri
    assert {"config.json", "search_space.json", "data_report.json"} <= {p.name for p in artifacts.iterdir()}
    assert list(elsewhere.iterdir()) == []  # no ./mlruns


def test_artifact_location_only_for_sqlite_stores(tmp_path: Path) -> None:
    assert artifact_location(f"sqlite:///{tmp_path}/o/mlflow.db") == (tmp_path / "o" / "mlartifacts").as_uri()
    assert artifact_location("http://mlflow:5000") is None  # a server keeps its own artifact store
    assert artifact_location("https://user:pw@mlflow.example.com") is None


def test_trials_carry_every_metric_the_selection_may_use() -> None:
    assert set(DIRECTIONS) | {SCORE} <= set(BEST_NAMES)


def test_parent_params_show_the_search_space_of_swept_keys(tmp_path: Path) -> None:
    client, parent, _ = _parent(
        tmp_path, ["sweep.lr.values=[1e-3,5e-3]", "sweep.epochs=[1,2]", "+sweep.params={train.lora.r:[8,16]}"]
    )
    params = client.get_run(parent).data.params
    assert params["train.lr"] == "grid_search([0.001, 0.005])"  # not the base train.lr no trial used
    assert params["train.epochs"] == "grid_search([1, 2])"
    assert params["train.lora.r"] == "grid_search([8, 16])"
    assert params["train.seed"] == "grid_search([0, 1])"  # the replicates: the default two seeds
    assert params["train.method"] == "lora" and params["eval.forgetting_budget"] == "0.05"  # the rest as configured
    space = json.loads(Path(client.download_artifacts(parent, "search_space.json", str(tmp_path))).read_text())
    assert space == {k: params[k] for k in ("train.lr", "train.epochs", "train.lora.r", "train.seed")}


def test_parent_params_show_sampled_search_spaces(tmp_path: Path) -> None:
    client, parent, _ = _parent(
        tmp_path,
        [
            "sweep.search=optuna",
            "sweep.seeds=[0]",
            "sweep.lr.values=[]",
            "sweep.lr.low=1e-5",
            "sweep.lr.high=1e-3",
            "sweep.epochs=[1,2]",
        ],
    )
    params = client.get_run(parent).data.params
    assert params["train.lr"] == "loguniform(1e-05, 0.001)"
    assert params["train.epochs"] == "choice([1, 2])"


def test_starting_a_sweeps_run_leaves_the_processs_tracking_uri_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: an in-process sweep then sent a later `jobs/submit.py`
    # (whose --mlflow defaults to that variable) to the earlier sweep's store.
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    _parent(tmp_path, [])
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_tracking_uri() == before


def test_a_stage_worse_than_its_base_is_tagged_so(tmp_path: Path) -> None:
    """A stage run in a real SQLite store: its selection tags say whether the chosen checkpoint is worse than the
    model the stage started from (the same tags a sweep trial's run gets from its outcome)."""
    from sftray.tracking.stage_runs import log_stage, start_chain

    cfg = compose_config([f"paths.output_dir={tmp_path / 'out'}", "stages=demo_two_stage"], conf=CONF, base=tmp_path)
    chain = start_chain(cfg, chain_dir=tmp_path / "chain")
    reason = "highest eval/format_compliance (0.000) ...; worse than the base model on eval/format_compliance"
    for index, worse in ((0, True), (1, False)):
        base = {"epoch": 0, "eval/format_compliance": 0.141, "eval/forgetting": 0.0}
        best = {"epoch": 1, "eval/format_compliance": 0.0 if worse else 0.5, "eval/forgetting": 0.01}
        record = {"index": index, "name": cfg.stages[index].name, "history": [base, best], "best_metrics": best}
        log_stage(
            cfg,
            parent_id=chain,
            record=record
            | {"best_checkpoint": "/x", "reason": reason, "worse_than_base": worse, "data": "/x", "run_path": None},
        )
    client = MlflowClient(tracking_uri(cfg))
    runs = client.search_runs([client.get_run(chain).info.experiment_id], filter_string="tags.`sftray.role` = 'stage'")
    tags = {r.data.tags["stage"]: r.data.tags for r in runs}
    assert tags["0"]["selection/worse_than_base"] == "true" and tags["0"]["best_reason"] == reason
    assert tags["1"]["selection/worse_than_base"] == "false"
