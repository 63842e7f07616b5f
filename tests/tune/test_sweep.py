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

from sftray.config import compose_config, override
from sftray.eval.base_eval import load as load_base_eval
from sftray.eval.metrics import BASE_EVAL_REUSED
from sftray.recipes.prep import prep
from sftray.recipes.sweep import sweep
from sftray.tune.sweep import table

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


RANK_AT = {1e-3: 4, 3e-3: 8}
"""sweep.points of the sweep below: LR -> the LoRA rank set with it."""


@pytest.fixture(scope="module")
def sweep_cfg(ray_local, cache_dir, tmp_path_factory, mlflow_server, random_base, write_sums):
    root = tmp_path_factory.mktemp("sweep")
    data = write_sums(root / "chats.jsonl", range(24))
    val = write_sums(root / "val.jsonl", range(30, 34))
    cfg = compose_config(
        [
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={root / 'out'}",
            f"model.name_or_path={random_base}",
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
            "sweep.every_trial=null",  # the trials train with the train.* keys here
            "sweep.name=tiny",
            # The LR comes from sweep.points, each with its own LoRA rank: the trials' params must be those pairs.
            "sweep.lr.values=[]",
            "sweep.seeds=[0]",
            f"sweep.points=[{{train.lr: 1e-3, train.lora.r: {RANK_AT[1e-3]}}}, {{train.lr: 3e-3, train.lora.r: {RANK_AT[3e-3]}}}]",
            "sweep.epochs=[1]",
            # one grid point makes its trial's worker exit at step 1: that trial must fail alone
            "+sweep.params={train.fail_at_step: [null, 1]}",
            f"tracking.uri={mlflow_server}",
            "tracking.wandb.enabled=true",  # offline here: no credentials
        ],
        conf=CONF,
        base=root,
    )
    return cfg


def _parent_runs(cfg):
    """Ids of the sweep's MLflow parent runs."""
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.sweep.name)
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`sftray.role` = 'sweep'")
    return [r.info.run_id for r in runs]


@pytest.fixture(scope="module")
def swept(sweep_cfg):
    """The sweep as ``sftray sweep`` runs it (its recipe): the outcome, the MLflow parent run, the prepared data."""
    outcome = sweep(sweep_cfg)
    (parent,) = _parent_runs(sweep_cfg)
    return outcome, parent, prep(sweep_cfg)  # the prepared data is cached: prep only finds it again


@pytest.fixture(scope="module")
def store(sweep_cfg, swept):
    """The MLflow store after the first sweep: its client, the experiment's runs, and the parent's children."""
    from mlflow import MlflowClient

    cfg = sweep_cfg
    _, parent, _ = swept
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.sweep.name)
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    return client, runs, children


def test_a_crashing_trial_fails_alone(swept):
    outcome, _, _ = swept
    statuses = sorted(r["status"] for r in outcome.trials)
    assert statuses == ["failed", "failed", "finished", "finished"], [
        (r["trial_id"], r["status"], r.get("error")) for r in outcome.trials
    ]
    assert all(r["overrides"]["train.fail_at_step"] == 1 for r in outcome.trials if r["status"] == "failed")
    # Every (point, fail_at_step) pair ran once; each row names its point's keys, not the point's index.
    pairs = sorted((r["overrides"]["train.lr"], r["overrides"]["train.fail_at_step"] or 0) for r in outcome.trials)
    assert pairs == [(1e-3, 0), (1e-3, 1), (3e-3, 0), (3e-3, 1)]
    assert all(r["overrides"]["train.lora.r"] == RANK_AT[r["overrides"]["train.lr"]] for r in outcome.trials)


def test_the_best_trial_is_a_finished_one_and_the_table_says_why(sweep_cfg, swept):
    outcome, _, _ = swept
    assert outcome.best is not None and outcome.best["status"] == "finished"
    assert Path(outcome.best["checkpoint"], "model").is_dir()
    text = table(outcome, sweep_cfg)
    assert f"best trial: {outcome.best['trial_id']}" in text and "why this epoch: highest" in text
    assert "ranked first: " in text and "within the forgetting budget" in outcome.best_reason
    assert text.splitlines()[0].split()[:5] == ["trial", "lr", "epochs", "fail_at_step", "r"]  # every swept key


def test_mlflow_parent_run_names_the_best_trial_and_keeps_the_sweeps_files(swept, store):
    outcome, parent, _ = swept
    client, runs, children = store
    assert len(children) == 4 and len(runs) == 5  # one child per trial, and the parent
    assert client.get_run(parent).data.tags["best_trial"] == outcome.best["trial_id"]
    assert {"config.json", "search_space.json", "data_report.json", "trials.txt", "best_trial.json"} <= {
        a.path for a in client.list_artifacts(parent)
    }
    params = client.get_run(parent).data.params  # a key set by sweep.points shows the values its points gave it
    assert params["train.lr"] == "sweep.points([0.001, 0.003])" and "sweep.point" not in params


def test_mlflow_child_runs_carry_status_tags_and_params(sweep_cfg, swept, store):
    cfg = sweep_cfg
    _, _, prepared = swept
    _, _, children = store
    assert sorted(r.info.status for r in children) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    for child in children:
        tags, params = child.data.tags, child.data.params
        assert tags["dataset_fingerprint"] == prepared.report["fingerprint"]
        assert tags["chat_template_hash"] == prepared.report["chat_template_hash"] and tags["git_commit"]
        assert tags["sftray_version"] == "0.1.0"
        assert params["train.method"] == cfg.train.method and params["train.lr"] in ("0.001", "0.003")
        assert params["train.lora.r"] == str(RANK_AT[float(params["train.lr"])])  # a point's keys travel together
        assert "sweep.point" not in params


def test_mlflow_finished_child_runs_carry_epochs_artifacts_and_the_selected_epoch(swept, store):
    outcome, _, _ = swept
    client, _, children = store
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 2
    for child in finished:
        history = client.get_metric_history(child.info.run_id, "val/loss")
        assert len(history) == 2  # the base model's eval (step 0) and epoch 1
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.json", "outcome.json", "report.json", "generations", "model"} <= names  # model: the adapter
        assert child.data.tags["best_checkpoint"].endswith("epoch_01")
        best = next(r for r in outcome.trials if r["trial_id"] == child.data.tags["trial_id"])
        assert child.data.metrics["best/score"] == best["score"] and child.data.metrics["best/epoch"] == 1


def test_the_base_models_eval_is_computed_once_and_reused_by_every_other_trial(sweep_cfg, swept, store):
    # Four trials share the model, data and eval inputs: one computes the base eval (the others wait on its lock
    # when they run at once) and stores it, three read it. Each trial's epoch-0 row says which it was.
    # The two trials that fault at step 1 may die before Train's controller collects their epoch-0 report (it
    # polls, about every 2 s; only checkpoint reports are waited for), so only the finished trials must carry it.
    client, _, children = store
    reused = {
        c.info.run_id: [m.value for m in client.get_metric_history(c.info.run_id, BASE_EVAL_REUSED)] for c in children
    }
    finished = [c.info.run_id for c in children if c.info.status == "FINISHED"]
    assert all(len(reused[run]) == 1 for run in finished), reused
    values = sorted(v for history in reused.values() for v in history)
    assert values.count(0.0) <= 1 and values.count(1.0) >= 1 and set(values) <= {0.0, 1.0}, reused
    (cached,) = (Path(sweep_cfg.paths.output_dir) / "base_eval").glob("*.json")
    metrics, _ = load_base_eval(cached)
    for child in [c for c in children if c.info.run_id in finished]:
        base = min(client.get_metric_history(child.info.run_id, "val/loss"), key=lambda m: m.step)  # epoch 0
        assert base.value == pytest.approx(metrics["val/loss"])


def test_wandb_offline_runs_one_per_trial_with_params_and_metrics(sweep_cfg, swept):
    # W&B (offline: no credentials here): one run per trial, named by the trial id, with the same dotted params
    # and the per-epoch metrics. wandb >= 0.30 has no Python reader for its log; the fields are plain protobuf
    # strings inside it.
    cfg = sweep_cfg
    outcome, _, _ = swept
    offline = {p.name.rsplit("-", 1)[-1]: p for p in (Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*")}
    assert sorted(offline) == sorted(r["trial_id"] for r in outcome.trials)
    for row in outcome.trials:
        log = b"".join(f.read_bytes() for f in offline[row["trial_id"]].glob("run-*.wandb"))
        assert b"train.lr" in log and b"sweep.name" in log and b"data.max_seq_len" in log
        if row["status"] == "finished":
            assert b"eval/score" in log and b"val/loss" in log


def test_report_notebook_runs_headless_on_the_sweep_and_draws_every_view(sweep_cfg, swept, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    cfg = sweep_cfg
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


# --- resume: after every test of the first sweep above (it reruns the failed trials) ----------------------------------


@pytest.fixture(scope="module")
def resumed(sweep_cfg, swept):
    """The sweep run again with sweep.resume=true, and the checkpoint times of the trials that had finished.

    Finished trials keep their results and are not trained again: their checkpoints stay untouched (Tune may
    rewrite its own files in the trial folder, so those are not the evidence).
    """
    outcome, _, _ = swept
    mtimes = {r["trial_id"]: _state_mtime(r) for r in outcome.trials if r["status"] == "finished"}
    again = sweep(override(sweep_cfg, "sweep.resume", True))
    return again, mtimes


def _state_mtime(row):
    return Path(row["checkpoint"], "train_state.pt").stat().st_mtime_ns


def test_resume_reuses_the_mlflow_parent_run(sweep_cfg, swept, resumed):
    _, parent, _ = swept
    assert _parent_runs(sweep_cfg) == [parent]


def test_resume_reruns_no_finished_trial(resumed):
    again, mtimes = resumed
    assert len(mtimes) == 2
    for trial_id, mtime in mtimes.items():
        row = next(r for r in again.trials if r["trial_id"] == trial_id)
        assert row["status"] == "finished" and _state_mtime(row) == mtime


def test_resume_logs_nothing_twice_to_mlflow(sweep_cfg, resumed):
    from mlflow import MlflowClient

    client = MlflowClient(sweep_cfg.tracking.uri)
    after = client.search_runs([client.get_experiment_by_name(sweep_cfg.sweep.name).experiment_id])
    assert len(after) == 5  # no duplicate child runs
    for child in (r for r in after if r.info.status == "FINISHED" and r.data.tags.get("sftray.role") == "trial"):
        assert len(client.get_metric_history(child.info.run_id, "val/loss")) == 2  # nothing logged twice
