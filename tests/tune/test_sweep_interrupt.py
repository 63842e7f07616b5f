"""Ctrl-C on ``sftray sweep``: it says where the trials got to and the command that resumes the sweep, and that
command continues the unfinished trial from its last checkpoint."""

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


def test_ctrl_c_on_a_sweep_prints_the_resume_command_that_continues_it(
    ray_local, cache_dir, tmp_path, random_base, write_sums
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
        "eval.num_probes=2",
        "eval.max_new_tokens=2",
        "train.num_workers=1",
        "train.cpus_per_worker=0.5",
        "train.micro_batch_size=4",
        "sweep.name=stopped",
        "sweep.lr.values=[1e-3]",
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
    # Interrupt once epoch 2's files exist: the loop goes on to epoch 2 only after Train has committed epoch 1's
    # checkpoint, so the resume has one to continue from. Files of the epoch being reported can be on disk before
    # Train registers them; a Ctrl-C in that instant leaves a resume nothing to continue but the files.
    while time.time() < deadline and not list(runs.glob("*/epoch_02/train_state.pt")):
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
    # worker may still finish an epoch or two of this tiny model meanwhile. Count checkpoints once it is gone.
    deadline = time.time() + 120
    while time.time() < deadline and list_actors(
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    ):
        time.sleep(0.5)
    (run,) = runs.iterdir()
    stopped_at = max(int(p.name.removeprefix("epoch_")) for p in run.glob("epoch_*") if (p / "train_state.pt").exists())
    assert stopped_at < 12

    assert main(argv[1:]) == 0  # the printed command, as a user runs it
    assert [p.name for p in runs.iterdir()] == [run.name]  # the same trial run, continued
    history = [m for m in load_state(run / "epoch_12")["history"] if m["epoch"] > 0]
    assert [m["epoch"] for m in history] == list(range(1, 13))  # no epoch repeated or skipped
    assert history[-1]["train/restarts"] >= 1  # it went on from a checkpoint instead of starting over
