"""Ctrl-C on ``sftray sweep``: it says where the trials got to and the command that resumes the sweep, and that
command continues the unfinished trial from its last checkpoint. The trial has also lost its worker once before
(fault injection) and gone on from its epoch checkpoint: through Tune for a one-worker trial (its loop runs in the
trial process), through Ray Train for a trial with two workers."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points

import pytest
from ray.util.state import list_actors

from sftray.train.checkpoint import load_state

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_on_a_sweep_prints_the_resume_command_that_continues_it(
    ray_local, cache_dir, tmp_path, random_base, write_sums, workers
):
    data = write_sums(tmp_path / "chats.jsonl", range(24))
    val = write_sums(tmp_path / "val.jsonl", range(30, 34))
    args = [
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={tmp_path / 'out'}",
        f"model.name_or_path={random_base}",
        "data=files",
        f"data.sources=[{{path:'{data}'}}]",
        f"data.val_sources=[{{path:'{val}'}}]",
        "data.max_seq_len=64",
        "data.packing=false",  # one row per conversation and no pretraining mix: 24 rows, 6 steps per epoch
        "mix.ratio=0",
        "eval.num_probes=2",
        "eval.max_new_tokens=2",
        "sweep.every_trial=null",  # the trials train with the train.* keys here
        f"train.num_workers={workers}",
        "train.cpus_per_worker=0.5",
        f"train.micro_batch_size={4 // workers}",  # 6 steps per epoch either way
        "train.fail_at_step=8",  # in epoch 2: the trial restarts from epoch 1's checkpoint
        "train.max_failures=1",
        "sweep.name=stopped",
        "sweep.lr.values=[1e-3]",
        "sweep.seeds=[0]",
        "sweep.epochs=[12]",
    ]
    runs = tmp_path / "out" / "sweeps" / "runs" / "stopped"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftray.cli", "sweep", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    deadline = time.time() + 300
    # Interrupt once epoch 3's files exist: the loop goes on to epoch 3 only after Tune (or Train) has registered
    # epoch 2's checkpoint, so the resume has one to continue from. Files of the epoch being reported can be on disk
    # before it is registered; a Ctrl-C in that instant leaves a resume nothing to continue but the files.
    while time.time() < deadline and not list(runs.glob("*/epoch_03/train_state.pt")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    err = err.decode()
    assert proc.returncode == 130, err[-3000:]
    assert "sweep 'stopped' interrupted" in err and "last complete trial checkpoint:" in err
    command = next(line for line in err.splitlines() if line.startswith("resume with:"))
    argv = shlex.split(command.removeprefix("resume with:"))
    assert argv[:2] == ["sftray", "sweep"] and argv[-1] == "sweep.resume=true"
    assert "Tuner.restore" not in err  # Ray's own hint names an API sftray users never call: sftray's is the one
    # Ray tears the interrupted trial down asynchronously (driver -> trial actor -> Train controller -> workers): a
    # trial may still finish an epoch or two of this tiny model meanwhile. Count checkpoints once it is gone.
    deadline = time.time() + 120
    own_job = ray_local.get_runtime_context().get_job_id()
    while time.time() < deadline and [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.job_id != own_job]:
        time.sleep(0.5)
    (run,) = runs.iterdir()
    stopped_at = max(int(p.name.removeprefix("epoch_")) for p in run.glob("epoch_*") if (p / "train_state.pt").exists())
    assert stopped_at < 12

    assert main(argv[1:]) == 0  # the printed command, as a user runs it
    assert [p.name for p in runs.iterdir()] == [run.name]  # the same trial run, continued
    history = [m for m in load_state(run / "epoch_12")["history"] if m["epoch"] > 0]
    assert [m["epoch"] for m in history] == list(range(1, 13))  # no epoch repeated or skipped
    # Epoch 2 ran again after the worker died in it, from epoch 1's checkpoint; the resume went on from a later one.
    assert history[0]["train/restarts"] == 0 and history[1]["train/restarts"] == 1
    assert history[-1]["train/restarts"] >= 2
