"""A tiny sweep on real Ray Tune, tracked in a real MLflow server on loopback: params, metrics, artifacts, tags,
a crashing trial that does not stop the others, and a resume that reruns no finished trial."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sftray.cli import compose_config
from sftray.data.pipeline import prepare
from sftray.tracking import mlflow_logger, trial_callbacks
from sftray.tune.sweep import override, run_sweep, search_space, table

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


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
def sweep_cfg(ray_local, cache_dir, tmp_path_factory, mlflow_server, random_base, write_sums):
    root = tmp_path_factory.mktemp("sweep")
    data = write_sums(root / "chats.jsonl", range(24))
    val = write_sums(root / "val.jsonl", range(30, 34))
    cfg = compose_config(
        [
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={root / 'out'}",
            "data=files",
            f"data.sources=[{{path:'{data}'}}]",
            # a file, not a hash split: a split of 24 rows by path hash can hold out none
            f"data.val_sources=[{{path:'{val}'}}]",
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
            "tracking.wandb.enabled=true",  # offline here: no credentials
        ],
        conf=CONF,
        base=root,
    )
    return cfg, str(random_base)


def _sweep(cfg, base):
    prepared = prepare(cfg)
    sweep_dir = Path(cfg.paths.output_dir) / "sweeps" / cfg.sweep.name
    parent = mlflow_logger.start_parent(cfg, space=search_space(cfg), data_report=prepared.report, sweep_dir=sweep_dir)
    callbacks = trial_callbacks(cfg, parent_id=parent, data_report=prepared.report)
    outcome = run_sweep(cfg, prepared=prepared, base_model=base, callbacks=callbacks)
    mlflow_logger.finish_parent(cfg, parent_id=parent, best=outcome.best, table_text=table(outcome))
    return outcome, parent, prepared


@pytest.fixture(scope="module")
def swept(sweep_cfg):
    cfg, base = sweep_cfg
    return _sweep(cfg, base)


def test_sweep_tracks_every_trial_survives_a_crash_and_resumes(sweep_cfg, swept):
    from mlflow import MlflowClient

    cfg, base = sweep_cfg
    outcome, parent, prepared = swept
    statuses = sorted(r["status"] for r in outcome.trials)
    assert statuses == ["failed", "failed", "finished", "finished"], [
        (r["trial_id"], r["status"], r.get("error")) for r in outcome.trials
    ]
    assert all(r["overrides"]["train.fail_at_step"] == 1 for r in outcome.trials if r["status"] == "failed")
    assert outcome.best is not None and outcome.best["status"] == "finished"
    assert Path(outcome.best["checkpoint"], "model").is_dir()
    text = table(outcome)
    assert f"best trial: {outcome.best['trial_id']}" in text and "why this epoch: highest" in text
    assert "ranked first: " in text and "within the forgetting budget" in outcome.best_reason

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
            best = next(r for r in outcome.trials if r["trial_id"] == tags["trial_id"])
            assert child.data.metrics["best/score"] == best["score"] and child.data.metrics["best/epoch"] == 1

    # W&B (offline: no credentials here): one run per trial, named by the trial id, with the same dotted params
    # and the per-epoch metrics. wandb >= 0.30 has no Python reader for its log; the fields are plain protobuf
    # strings inside it.
    offline = {p.name.rsplit("-", 1)[-1]: p for p in (Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*")}
    assert sorted(offline) == sorted(r["trial_id"] for r in outcome.trials)
    for row in outcome.trials:
        log = b"".join(f.read_bytes() for f in offline[row["trial_id"]].glob("run-*.wandb"))
        assert b"train.lr" in log and b"sweep.name" in log and b"data.max_seq_len" in log
        if row["status"] == "finished":
            assert b"eval/score" in log and b"val/loss" in log

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


def test_report_notebook_runs_headless_on_the_sweep_and_draws_every_view(sweep_cfg, swept, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    cfg, _ = sweep_cfg
    outcome, _, _ = swept
    notebook = nbformat.read(ROOT / "analysis" / "sweep_report.ipynb", as_version=4)
    monkeypatch.setenv("SFTRAY_MLFLOW_URI", cfg.tracking.uri)  # the kernel inherits this process's environment
    monkeypatch.setenv("SFTRAY_SWEEP", cfg.sweep.name)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend is what renders figures
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "analysis")}}
    ).execute()

    outputs = [(cell, out) for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for _, out in outputs if out.output_type == "error"]
    images = [out for _, out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 3  # loss curves, LR x epochs heatmap, forgetting vs compliance
    html = "\n".join(out["data"].get("text/html", "") for _, out in outputs if "data" in out)
    for row in outcome.trials:  # the trial table lists every trial, failed ones included
        assert row["trial_id"] in html
    assert "FAILED" in html and "base model" in html and "tuned" in html  # the generations side by side
    assert f"best trial: **{outcome.best['trial_id']}**" in "\n".join(
        out["data"].get("text/markdown", "") for _, out in outputs if "data" in out
    )
