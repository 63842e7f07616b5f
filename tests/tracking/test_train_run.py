"""A single ``sftray train`` run in MLflow, driven through the command as a user runs it: the run with its params,
per-epoch metrics, train/loss several times per epoch, the data report and the selected checkpoint's model folders
(loadable with plain transformers/peft after a download); ``tracking.log_model=none`` logs no model and
``tracking.log_every_steps`` spaces the train/loss points."""

from __future__ import annotations

import math
from importlib.metadata import entry_points
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from sftray.config import LOSS_POINTS_PER_EPOCH
from sftray.tracking.sweep_report import main as report_check

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

pytestmark = [pytest.mark.ray, pytest.mark.slow]
EXPERIMENT = "train"


@pytest.fixture(scope="module")
def tracked(ray_local, tmp_path_factory, random_base, training_run):
    """Two LoRA runs of the training tests' data on one worker, one packed row per optimizer step (a dozen per epoch):
    one with the default tracking (2 epochs, merged/ exported), one with ``tracking.log_model=none`` and a train/loss
    point every 2 steps (1 epoch)."""
    root = tmp_path_factory.mktemp("tracked")
    out = root / "out"
    overrides = [
        *training_run(root, out),
        f"model.name_or_path={random_base}",
        "train.method=lora",
        "train.lora.target_modules=[q_proj,v_proj]",
        "train.num_workers=1",
        "train.cpus_per_worker=1",
        "train.micro_batch_size=1",
    ]
    assert main(["train", *overrides, "train.epochs=2", "train.export_merged=true"]) == 0
    assert (out / "mlflow.db").is_file(), f"sftray train created no MLflow store in {out}"
    assert main(["train", *overrides, "train.epochs=1", "tracking.log_model=none", "tracking.log_every_steps=2"]) == 0
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return uri, client, runs, root


def test_every_single_run_is_a_finished_mlflow_run_with_its_params(tracked):
    _, _, runs, _ = tracked
    assert len(runs) == 2
    first, second = runs
    assert first.info.status == second.info.status == "FINISHED"
    assert first.data.params["train.method"] == "lora" and first.data.params["train.epochs"] == "2"
    assert second.data.params["tracking.log_model"] == "none"
    assert first.data.tags["sftray.role"] == "train" and Path(first.data.tags["best_checkpoint"]).is_dir()
    assert "eval/format_compliance" in first.data.tags["best_reason"]


def test_metrics_per_epoch_and_train_loss_several_times_per_epoch(tracked):
    _, client, runs, _ = tracked
    run_id = runs[0].info.run_id
    val = sorted(client.get_metric_history(run_id, "val/loss"), key=lambda m: m.step)
    per_epoch = val[1].step
    assert per_epoch >= 5 and [m.step for m in val] == [0, per_epoch, 2 * per_epoch]  # base, then each epoch's end
    train = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    steps = [m.step for m in train]
    every = math.ceil(per_epoch / LOSS_POINTS_PER_EPOCH)  # the default spacing: a handful per epoch
    expected = sorted({*range(every, 2 * per_epoch + 1, every), per_epoch, 2 * per_epoch})
    assert steps == expected and len([s for s in steps if s <= per_epoch]) >= 3, (steps, per_epoch)
    assert all(m.value > 0 for m in train)
    assert runs[0].data.metrics["best/epoch"] in (1, 2)


def test_data_report_and_the_selected_model_are_artifacts_that_load(tracked, random_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    uri, client, runs, root = tracked
    run_id = runs[0].info.run_id
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.json", "model", "merged"} <= names, names
    where = root / "download"
    adapter = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(where), tracking_uri=uri))
    assert (adapter / "adapter_config.json").is_file()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(random_base), str(adapter))
    assert any("lora_" in name for name, _ in tuned.named_parameters())
    merged = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/merged", dst_path=str(where), tracking_uri=uri)
    AutoModelForCausalLM.from_pretrained(merged)  # plain transformers, no peft


def test_log_every_steps_sets_the_train_loss_spacing(tracked):
    _, client, runs, _ = tracked
    run_id = runs[1].info.run_id
    per_epoch = max(m.step for m in client.get_metric_history(run_id, "val/loss"))  # one epoch
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == sorted({*range(2, per_epoch + 1, 2), per_epoch}), (steps, per_epoch)


def test_log_model_none_logs_no_model(tracked):
    _, client, runs, _ = tracked
    names = {a.path for a in client.list_artifacts(runs[1].info.run_id)}
    assert "report.json" in names and "model" not in names and "merged" not in names, names


def test_report_check_refuses_the_train_experiment_in_one_line(tracked, capsys):
    uri, _, _, _ = tracked
    assert report_check([uri, EXPERIMENT]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and EXPERIMENT in err[0], err
