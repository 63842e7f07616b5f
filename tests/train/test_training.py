"""Training on real Ray Train workers (CPU, gloo): parallelism equivalence, checkpoints, LoRA, failure recovery.

Each epoch is exactly one optimizer step over ALL training rows (micro_batch_size = rows per rank), so the global
batch is the same set of rows whatever the row-to-rank split: 1-worker, 2-worker FSDP2 and 2-worker DDP runs must
then produce the same losses up to float32 reduction order (tolerance below).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from importlib.metadata import entry_points
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftray.config import compose_config
from sftray.data.collate import collate_rows
from sftray.eval.evaluate import heldout_loss
from sftray.recipes.prep import prep
from sftray.train.checkpoint import load_state
from sftray.train.controller import TRAIN_SETTINGS
from sftray.train.run import run_training

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
RTOL = 1e-4
"""Relative tolerance between parallel layouts: float32 sums in a different order differ by ~1e-6."""


@pytest.fixture(scope="module")
def setup(ray_local, tmp_path_factory, random_base, training_run):
    root = tmp_path_factory.mktemp("train")
    overrides = [
        *training_run(root, root / "out"),
        "train.epochs=3",
        "train.cpus_per_worker=0.5",
        "train.lora.dropout=0",
        "train.lora.target_modules=[q_proj,v_proj]",
    ]
    cfg = compose_config(overrides, conf=CONF, base=root)
    prepared = prep(cfg)
    return cfg, prepared, str(random_base), root, overrides


def _one_step_per_epoch(cfg, prepared, *, workers: int, **train):
    rows = prepared.report["splits"]["train"]["rows"]
    per_rank = math.ceil(rows / workers)
    t = dataclasses.replace(cfg.train, num_workers=workers, micro_batch_size=per_rank, **train)
    return dataclasses.replace(cfg, train=t)


def _run(setup, name, **train):
    cfg, prepared, base, root, _ = setup
    run_cfg = _one_step_per_epoch(cfg, prepared, **train)
    return run_training(run_cfg, prepared=prepared, base_model=base, name=name, storage_path=str(root / "runs"))


CONTROLLER_ENV = "controller_env.json"
"""Where the ``fsdp2`` run's controller writes its Train settings (below the tests' root)."""


def _controller_recorder(path: Path):
    """A Train callback that runs inside the controller actor and writes that process's Train settings to ``path``
    (a class made here so that Ray pickles it by value into the controller)."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class RecordControllerEnv(ControllerCallback):
        def after_controller_start(self, train_run_context):
            env = {name: os.environ.get(name) for name in TRAIN_SETTINGS}
            path.write_text(json.dumps({"pid": os.getpid(), "env": env}))

    return RecordControllerEnv()


@pytest.fixture(scope="module")
def fsdp2(setup):
    cfg, prepared, base, root, _ = setup
    run_cfg = _one_step_per_epoch(cfg, prepared, workers=2, parallelism="fsdp")
    return run_training(
        run_cfg,
        prepared=prepared,
        base_model=base,
        name="fsdp2",
        storage_path=str(root / "runs"),
        callbacks=[_controller_recorder(root / CONTROLLER_ENV)],
    )


def _epochs(outcome):
    return [m for m in outcome.history if m["epoch"] > 0]


def _val_loss(model, prepared, cfg) -> float:
    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    rows = pq.read_table(prepared.val_dir).to_pylist()
    collate = partial(collate_rows, pad_id=tok.pad_token_id, packed=True, pad_to=cfg.data.max_seq_len)
    batches = [collate({k: [r[k] for r in rows[i : i + 4]] for k in rows[0]}) for i in range(0, len(rows), 4)]
    return heldout_loss(model.eval(), batches, device=torch.device("cpu"))


def test_the_controller_runs_with_sftrays_train_settings(setup, fsdp2):
    """The poll interval and the preemption watcher are read by the controller actor: fit() hands it the driver's
    values of Ray's propagated variables as its runtime_env, so they must be among them; metrics are read by the
    driver. (The controller process's own environment showed them when this module ran alone but not in one
    whole-suite run, cause not found: this checks what sftray controls, the values handed to fit().)"""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from sftray.train.controller import apply_train_settings

    apply_train_settings()  # what run_training does before every TorchTrainer
    handed = get_env_vars_to_propagate()
    assert handed["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == TRAIN_SETTINGS["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
    assert handed["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_TRAIN_METRICS_ENABLED"] == "0"
    controller = json.loads((setup[3] / CONTROLLER_ENV).read_text())
    assert controller["pid"] != os.getpid()


def test_one_worker_fsdp_and_ddp_match_two_worker_fsdp(setup, fsdp2):
    single = _run(setup, "fsdp1", workers=1, parallelism="fsdp")
    ddp = _run(setup, "ddp2", workers=2, parallelism="ddp")
    ref = _epochs(fsdp2)
    assert [m["step"] for m in ref] == [1, 2, 3]
    assert ref[0]["train/loss"] > ref[-1]["train/loss"]  # it learns: the comparison is not between constants
    for other in (single, ddp):
        got = _epochs(other)
        assert [m["step"] for m in got] == [1, 2, 3]
        for a, b in zip(ref, got):
            assert a["train/target_tokens"] == b["train/target_tokens"]
            for key in ("train/loss", "val/loss", "eval/pretrain_loss"):
                assert b[key] == pytest.approx(a[key], rel=RTOL), (key, a["epoch"])


def test_full_checkpoint_reloads_with_from_pretrained_and_reproduces_the_model(setup, fsdp2):
    cfg, prepared, _, _, _ = setup
    assert len(fsdp2.checkpoints) == 3  # one per epoch
    for path, metrics in fsdp2.checkpoints:
        model = AutoModelForCausalLM.from_pretrained(Path(path) / "model")
        assert _val_loss(model, prepared, cfg) == pytest.approx(metrics["val/loss"], rel=1e-5)
        assert (Path(path) / "probes.json").is_file() and (Path(path) / "probes_base.json").is_file()
    assert fsdp2.best_checkpoint in [p for p, _ in fsdp2.checkpoints]
    assert "eval/format_compliance" in fsdp2.best_reason


def test_lora_trains_only_adapters_and_exports_a_merged_model(setup):
    cfg, prepared, base_path, _, _ = setup
    outcome = _run(setup, "lora", workers=2, parallelism="fsdp", method="lora", epochs=2, export_merged=True)
    path, metrics = outcome.checkpoints[-1]
    adapter = Path(path) / "model" / "adapter_model.safetensors"
    with safe_open(adapter, "pt") as f:
        keys = list(f.keys())
        assert keys and all("lora_" in k for k in keys), keys
        assert any(f.get_tensor(k).abs().sum() > 0 for k in keys if "lora_B" in k)  # B starts at 0: it trained
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_path)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(Path(path) / "model"))
    assert _val_loss(peft_model, prepared, cfg) == pytest.approx(metrics["val/loss"], rel=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(Path(path) / "merged")  # plain transformers, no peft
    assert _val_loss(merged, prepared, cfg) == pytest.approx(metrics["val/loss"], rel=1e-5)
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    targets = tuple(cfg.train.lora.target_modules)
    changed = {k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])}
    assert changed and all(k.split(".")[-2] in targets for k in changed), changed


def test_worker_failure_resumes_from_the_last_checkpoint(setup, fsdp2):
    outcome = _run(setup, "failure", workers=2, parallelism="fsdp", fail_at_step=2, max_failures=1)
    epochs = _epochs(outcome)
    assert [m["epoch"] for m in epochs] == [1, 2, 3] and epochs[-1]["step"] == 3  # no epoch repeated or skipped
    assert epochs[0]["train/restarts"] == 0 and epochs[-1]["train/restarts"] == 1  # it did fail and resume
    ref = _epochs(fsdp2)
    assert epochs[-1]["train/loss"] == pytest.approx(ref[-1]["train/loss"], rel=RTOL)
    assert epochs[-1]["val/loss"] == pytest.approx(ref[-1]["val/loss"], rel=RTOL)


def _cli_args(setup, *, workers: int = 2) -> list[str]:
    """The fixture's run as a user types it: the same overrides, one optimizer step per epoch."""
    cfg, prepared, base, _, overrides = setup
    per_rank = math.ceil(prepared.report["splits"]["train"]["rows"] / workers)
    return [
        *overrides,
        f"model.name_or_path={base}",
        f"train.num_workers={workers}",
        f"train.micro_batch_size={per_rank}",
    ]


def _new_run(runs: Path, before: set[Path]) -> Path:
    (run,) = set(runs.iterdir()) - before
    return run


def test_resume_from_continues_an_interrupted_run_to_the_uninterrupted_result(setup, fsdp2, capsys, ray_local):
    """A 3-epoch run stopped in epoch 3 and resumed from epoch_02 with ``make train resume_from=...`` as the CLI
    prints it ends at the same step with the same losses as the uninterrupted run (``fsdp2``), to RTOL."""
    _, _, _, root, _ = setup
    runs = root / "out" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    before = set(runs.iterdir())
    # The last worker dies at step 3 (epoch 3) and no restart is allowed: the run stops after epoch 2.
    assert main(["train", *_cli_args(setup), "train.fail_at_step=3", "train.max_failures=0"]) == 1
    failed = _new_run(runs, before)
    err = capsys.readouterr().err
    assert f"training failed; last complete checkpoint: {failed / 'epoch_02'}" in err
    command = next(line for line in err.splitlines() if line.startswith("resume with:"))
    argv = shlex.split(command.removeprefix("resume with:"))
    assert argv[:2] == ["sftray", "train"] and argv[-1] == f"train.resume_from={failed / 'epoch_02'}"

    make = next(line for line in err.splitlines() if "make train" in line).split("or:", 1)[1].strip()
    assert make.startswith("make train ARGS=") and make.endswith(f"resume_from={failed / 'epoch_02'}")

    before = set(runs.iterdir())
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    done = subprocess.run(make, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = _new_run(runs, before)
    assert sorted(p.name for p in resumed.glob("epoch_*")) == ["epoch_03"]  # only what was left
    history = load_state(resumed / "epoch_03")["history"]
    epochs = [m for m in history if m["epoch"] > 0]
    ref = _epochs(fsdp2)
    assert [m["step"] for m in epochs] == [m["step"] for m in ref] == [1, 2, 3]
    assert epochs[-1]["train/restarts"] == 1
    for key in ("train/loss", "val/loss", "eval/pretrain_loss"):
        assert epochs[-1][key] == pytest.approx(ref[-1][key], rel=RTOL), key
    # Selection covers the whole training: the earlier run's epochs are candidates too.
    out = done.stdout
    best = Path(out.split("best checkpoint: ")[1].split()[0])
    assert best in {failed / "epoch_01", failed / "epoch_02", resumed / "epoch_03"}


GSM8K_PATTERN = "eval.answer_pattern='#### *(\\S+)'"
"""GSM8K's final answer (``#### 72`` ends every worked solution), as a user types it."""


def _gsm8k_probes(root: Path) -> tuple[Path, list[str]]:
    """A GSM8K-style probe file (question, worked answer ending in ``#### N``), and the overrides that read it."""
    path = root / "gsm8k_test.jsonl"
    rows = [
        {"question": f"Add {i} and {i + 3}.", "answer": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}"}
        for i in range(40, 46)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, [f"data.probes={path}", "+data.probe_columns={prompt: question, reference: answer}", GSM8K_PATTERN]


def test_ctrl_c_prints_the_last_checkpoint_and_the_command_that_resumes_it(setup, ray_local):
    """``sftray train`` in its own process, joined to the test cluster; SIGINT once its first checkpoint exists.
    Its probes are a GSM8K-style file read through data.probe_columns and scored by eval.answer_pattern."""
    _, _, _, root, _ = setup
    runs = root / "out" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    before = set(runs.iterdir())
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    gsm8k, probe_args = _gsm8k_probes(root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftray.cli", "train", *_cli_args(setup), "train.epochs=30", *probe_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=root,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not [
        p for p in runs.glob("*/epoch_01/train_state.pt") if p.parents[1] not in before
    ]:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    err = err.decode()
    assert proc.returncode == 130, err[-3000:]
    run = _new_run(runs, before)
    line = next(line for line in err.splitlines() if "last complete checkpoint:" in line)
    last = Path(line.split("last complete checkpoint: ")[1])
    assert line.startswith("training interrupted") and last.parent == run and (last / "train_state.pt").is_file()
    assert last.name != "epoch_30"  # it did stop early
    command = next(line for line in err.splitlines() if line.startswith("resume with:"))
    argv = shlex.split(command.removeprefix("resume with:"))
    assert argv[-1] == f"train.resume_from={last}" and set(probe_args) <= set(argv)
    assert f"resume_from={last}" in next(line for line in err.splitlines() if "make train" in line)
    # train.parallelism is left at its default, auto: the tiny model's replica fits a worker many times over.
    assert "train.parallelism=auto: ddp (a replica with gradients and AdamW state" in err

    # The probes are the file's questions; exact match compares the final answers, not the worked solutions.
    questions = [json.loads(line) for line in gsm8k.read_text().splitlines()][:4]  # eval.num_probes=4
    for table in (run / "epoch_01" / "probes.json", run / "epoch_01" / "probes_base.json"):
        rows = json.loads(table.read_text())
        assert [r["prompt"] for r in rows] == [q["question"] for q in questions]
        assert [r["reference_answer"] for r in rows] == [q["answer"].rsplit(" ", 1)[1] for q in questions]
        for r in rows:
            assert "answer" in r and r["exact_match"] == (r["compliant"] and r["answer"] == r["reference_answer"])


def test_workers_do_not_log_every_report(fsdp2) -> None:
    """Ray Train logs each report's whole metrics dict from every rank; sftray prints its own table once instead.
    The workers' log files (Ray's session folder) of the 2-rank run show checkpoints but no per-report dump."""
    logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs"
    text = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*") if p.suffix in (".out", ".err"))
    assert "Checkpoint successfully created" in text  # the run's worker logs are there
    assert "Reporting training result" not in text


def test_a_deterministic_setup_error_on_the_workers_is_not_retried(setup):
    """A worker that cannot build its model (here a LoRA target of no module, which ``sftray train`` catches before
    Ray starts, but a run started from Python or a sweep point reaches the workers with) fails the run at once with
    the error itself: Train retried it as a worker failure (train.max_failures), starting the worker group again to
    fail the same way, and raised TrainingFailedError around a traceback per rank and attempt."""
    cfg = setup[0]
    lora = dataclasses.replace(cfg.train.lora, target_modules=["nosuch"])
    with pytest.raises(ValueError) as err:
        _run(setup, "setup-error", workers=2, method="lora", lora=lora, max_failures=1)
    assert type(err.value).__name__ == "WorkerSetupError", type(err.value).__mro__
    assert str(err.value).startswith("training could not start, and would fail the same way again (not retried):")
    assert "rank 0: NoMatchingPeftModuleError: Target modules {'nosuch'} not found" in str(err.value)
    assert "rank 1: NoMatchingPeftModuleError" in str(err.value)
