"""A tiny sweep on real Ray Tune, tracked in a real MLflow server on loopback: params, metrics, artifacts, tags,
a crashing trial that does not stop the others, and a resume that reruns no finished trial."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sftray.cli import compose_config
from sftray.data.pipeline import prepare
from sftray.tracking import mlflow_logger
from sftray.tune.sweep import override, run_sweep, search_space, table

pytestmark = [pytest.mark.ray, pytest.mark.slow]
CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "art"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not come up in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def sweep_cfg(ray_local, cache_dir, tmp_path_factory, mlflow_server, random_base):
    root = tmp_path_factory.mktemp("sweep")
    data = root / "chats.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Add {i} and {i}."},
                        {"role": "assistant", "content": str(2 * i)},
                    ]
                }
            )
            + "\n"
            for i in range(24)
        )
    )
    cfg = compose_config(
        [
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={root / 'out'}",
            "data=files",
            f"data.sources=[{{path:'{data}'}}]",
            "data.max_seq_len=64",
            "mix.ratio=0.1",
            "eval.num_probes=4",
            "eval.max_new_tokens=4",
            "train.num_workers=1",
            "train.cpus_per_worker=0.5",
            "train.micro_batch_size=8",
            "train.max_failures=0",
            "sweep.name=tiny",
            "sweep.lr.values=[1e-3,3e-3]",
            "sweep.epochs=[1]",
            # one grid point makes its trial's worker exit at step 1: that trial must fail alone
            "+sweep.params={train.fail_at_step: [null, 1]}",
            f"tracking.uri={mlflow_server}",
        ],
        conf=CONF,
        base=root,
    )
    return cfg, str(random_base)


def _sweep(cfg, base):
    prepared = prepare(cfg)
    sweep_dir = Path(cfg.paths.output_dir) / "sweeps" / cfg.sweep.name
    parent = mlflow_logger.start_parent(cfg, space=search_space(cfg), data_report=prepared.report, sweep_dir=sweep_dir)
    callbacks = [
        mlflow_logger.MlflowTrialLogger(
            cfg, parent_id=parent, tags=mlflow_logger.base_tags(cfg, data_report=prepared.report)
        )
    ]
    outcome = run_sweep(cfg, prepared=prepared, base_model=base, callbacks=callbacks)
    mlflow_logger.finish_parent(cfg, parent_id=parent, best=outcome.best, table_text=table(outcome))
    return outcome, parent, prepared


def test_sweep_tracks_every_trial_survives_a_crash_and_resumes(sweep_cfg):
    from mlflow import MlflowClient

    cfg, base = sweep_cfg
    outcome, parent, prepared = _sweep(cfg, base)
    statuses = sorted(r["status"] for r in outcome.trials)
    assert statuses == ["failed", "failed", "finished", "finished"], outcome.trials
    assert all(r["overrides"]["train.fail_at_step"] == 1 for r in outcome.trials if r["status"] == "failed")
    assert outcome.best is not None and outcome.best["status"] == "finished"
    assert Path(outcome.best["checkpoint"], "model").is_dir()
    text = table(outcome)
    assert f"best trial: {outcome.best['trial_id']}" in text and "why: highest" in text

    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == 4 and len(runs) == 5
    assert sorted(r.info.status for r in children) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    parent_run = client.get_run(parent)
    assert parent_run.data.tags["best_trial"] == outcome.best["trial_id"]
    assert {"config.json", "search_space.json", "data_report.json", "trials.txt", "best_trial.json"} <= {
        a.path for a in client.list_artifacts(parent)
    }
    for child in children:
        tags, params = child.data.tags, child.data.params
        assert tags["dataset_fingerprint"] == prepared.report["fingerprint"]
        assert tags["chat_template_hash"] == prepared.report["chat_template_hash"] and tags["git_commit"]
        assert tags["sftray_version"] == "0.1.0"
        assert params["train.method"] == cfg.train.method and params["train.lr"] in ("0.001", "0.003")
        if child.info.status == "FINISHED":
            history = client.get_metric_history(child.info.run_id, "val/loss")
            assert len(history) == 2  # the base model's eval (step 0) and epoch 1
            names = {a.path for a in client.list_artifacts(child.info.run_id)}
            assert {"config.json", "outcome.json", "report.json", "generations"} <= names
            assert tags["best_checkpoint"].endswith("epoch_01")

    # Resume: finished trials keep their results and are not trained again (their checkpoints stay untouched;
    # Tune may rewrite its own files in the trial folder, so those are not the evidence).
    finished = {
        r["trial_id"]: Path(r["checkpoint"], "train_state.pt").stat().st_mtime_ns
        for r in outcome.trials
        if r["status"] == "finished"
    }
    resumed, parent_again, _ = _sweep(override(cfg, "sweep.resume", True), base)
    assert parent_again == parent  # the same MLflow parent run
    for trial_id, mtime in finished.items():
        row = next(r for r in resumed.trials if r["trial_id"] == trial_id)
        assert row["status"] == "finished" and Path(row["checkpoint"], "train_state.pt").stat().st_mtime_ns == mtime
    after = client.search_runs([experiment.experiment_id])
    assert len(after) == 5  # no duplicate child runs
    for child in (r for r in after if r.info.status == "FINISHED" and r.data.tags.get("sftray.role") == "trial"):
        assert len(client.get_metric_history(child.info.run_id, "val/loss")) == 2  # nothing logged twice
