"""Training on a two-node Ray cluster (simulated on this machine): one worker per node, shared checkpoints, recovery.

The cluster (``ray.cluster_utils.Cluster``: a head and a second node, each with its own raylet and object store) runs
in a subprocess, which is the Ray driver: it prepares the data, trains with ``run_training`` and reads the selected
checkpoint back, as ``sftray train`` does on a real head node. The session-wide local Ray of tests/conftest.py is
untouched, and the subprocess gets its own ``RAY_TMPDIR``: the cluster's ``ray_current_cluster`` file and session
folder never land in /tmp/ray, so a cluster that dies without ``cluster.shutdown()`` cannot leave a stale address
that a later ``ray.init(num_cpus=...)`` would try to join.

Placement, one worker per node: the head has 3 logical CPUs, the second node 2, and each worker takes
``train.cpus_per_worker=1.6``. No node holds two workers (3.2 CPUs), so Train's placement group (2 bundles, PACK)
must span both nodes; the CPUs left over (1.4 + 0.4) hold Ray Data's tasks, and the Train controller asks for 0 CPU.
Logical CPUs are only labels: torch runs int(1.6) = 1 thread per worker, 2 threads on this 2-core machine.

Which worker is killed: ``train.fail_at_step`` makes the last rank (1 of 2) exit. Train V2 numbers workers node by
node in bundle order, and Ray's PACK policy put bundle 0 on the node with the most CPU (here the head) every time
we looked, so rank 1 lands on the second node. Ray does not document that order, so the test does not assume it: a ``UserCallback`` records
which rank failed and how (the dead actor's id), and the state API says which node that actor ran on (it needs the
dashboard, started on a free port: another Ray on this machine may hold the default 8265).

One training run (2 epochs, one optimizer step each; the kill comes at step 2, after epoch 1's checkpoint) serves
both tests: the run must finish and select a checkpoint, and it must have resumed from epoch 1 after the kill.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from sftray.layout import epoch_dir_name

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EPOCHS = 2
FAIL_AT_STEP = 2  # one step per epoch: rank 1 dies in epoch 2, after epoch 1's checkpoint

TWO_NODES = r"""
import dataclasses, json, math, sys, time
from functools import partial
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.train import UserCallback

args = json.loads(sys.argv[1])
clock = [("start", time.monotonic())]


class RecordFailures(UserCallback):
    # Runs in the Train controller (another process): appends each failure to a JSON file.
    def after_exception(self, run_context, worker_exceptions):
        path = Path(args["failures"])
        seen = json.loads(path.read_text()) if path.exists() else []
        seen.append({str(rank): f"{type(e).__name__}: {e}" for rank, e in worker_exceptions.items()})
        path.write_text(json.dumps(seen))


head = {"num_cpus": 3, "include_dashboard": True, "dashboard_port": args["dashboard_port"]}
cluster = Cluster(initialize_head=True, head_node_args=head)
try:
    second = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    clock.append(("cluster", time.monotonic()))

    import pyarrow.parquet as pq
    import torch
    from ray.util.state import list_actors
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftray.config import compose_config
    from sftray.data.collate import collate_rows
    from sftray.eval.evaluate import heldout_loss
    from sftray.recipes.prep import prep
    from sftray.train.checkpoint import load_state
    from sftray.train.run import run_training

    cfg = compose_config(args["overrides"], base=Path(args["base"]))
    prepared = prep(cfg)
    clock.append(("prep", time.monotonic()))
    # micro_batch_size = rows per rank: one optimizer step per epoch
    rows = prepared.report["splits"]["train"]["rows"]
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, micro_batch_size=math.ceil(rows / cfg.train.num_workers))
    )
    outcome = run_training(
        cfg, prepared=prepared, base_model=args["model"], name=args["name"], storage_path=args["storage"],
        callbacks=[RecordFailures()],
    )
    clock.append(("train", time.monotonic()))

    # The driver reads the selected checkpoint from the shared storage: its state and its model.
    best = Path(outcome.best_checkpoint)
    state = load_state(best)
    model = AutoModelForCausalLM.from_pretrained(best / "model")
    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    val = pq.read_table(prepared.val_dir).to_pylist()
    collate = partial(collate_rows, pad_id=tok.pad_token_id, packed=True, pad_to=cfg.data.max_seq_len)
    batches = [collate({k: [r[k] for r in val[i : i + 4]] for k in val[0]}) for i in range(0, len(val), 4)]

    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
    result = {
        "head": ray.get_runtime_context().get_node_id(),
        "second": second.node_id,
        "alive_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
        "outcome": dataclasses.asdict(outcome),
        "driver_read": {
            "epoch": state["epoch"],
            "step": state["step"],
            "history_epochs": [m["epoch"] for m in state["history"]],
            "val_loss": heldout_loss(model.eval(), batches, device=torch.device("cpu")),
        },
        "workers": [
            {
                "actor_id": a.actor_id,
                "node_id": a.node_id,
                "state": a.state,
                "reason": ((a.death_cause or {}).get("actor_died_error_context") or {}).get("reason"),
            }
            for a in workers
        ],
    }
    clock.append(("read", time.monotonic()))
    result["seconds"] = {name: round(t - t0, 1) for (_, t0), (name, t) in zip(clock, clock[1:])}
    print("RESULT " + json.dumps(result, default=str), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes(random_base, tmp_path_factory, training_run):
    """Runs the training on the two-node cluster once; returns (its result dict, storage path, failures seen)."""
    root = tmp_path_factory.mktemp("multinode-train")
    shared = root / "shared"  # both "nodes" see it: the shared storage of a real cluster
    overrides = [
        *training_run(root, shared),
        "train.parallelism=fsdp",
        f"train.epochs={EPOCHS}",
        "train.num_workers=2",
        "train.cpus_per_worker=1.6",
        f"train.fail_at_step={FAIL_AT_STEP}",
        "train.max_failures=1",
    ]
    storage = shared / "runs"
    failures = root / "failures.json"
    args = {
        "overrides": overrides,
        "base": str(root),
        "model": str(random_base),
        "name": "two-nodes",
        "storage": str(storage),
        "failures": str(failures),
        "dashboard_port": _free_port(),  # not 8265: another Ray on this machine may hold it
    }
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live below it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    proc = subprocess.Popen(
        [sys.executable, "-c", TWO_NODES, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: a hung cluster is killed whole below
    )
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, err[-5000:]
    line = next(line for line in reversed(out.splitlines()) if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    print("two-node driver, seconds per phase:", result["seconds"])
    return result, storage, json.loads(failures.read_text()) if failures.exists() else []


def _epochs(history: list[dict]) -> list[dict]:
    return [m for m in history if m["epoch"] > 0]


def test_two_node_training_finishes_and_the_driver_reads_the_selected_checkpoint(two_nodes):
    result, storage, _ = two_nodes
    assert result["alive_nodes"] == sorted([result["head"], result["second"]])
    outcome = result["outcome"]
    run = storage / "two-nodes"
    assert Path(outcome["path"]) == run
    # Every epoch's checkpoint is in the shared storage_path, whichever attempt wrote it.
    paths = [Path(p) for p, _ in outcome["checkpoints"]]
    assert paths == [run / epoch_dir_name(e) for e in range(1, EPOCHS + 1)]
    for path in paths:
        assert (path / "train_state.pt").is_file() and (path / "model" / "config.json").is_file()
    best = Path(outcome["best_checkpoint"])
    assert best in paths and best.is_relative_to(storage)
    # The driver loaded that checkpoint: its state is the selected epoch's, its model reproduces the val loss.
    read = result["driver_read"]
    assert read["epoch"] == outcome["best_metrics"]["epoch"]
    assert read["step"] == outcome["best_metrics"]["step"]
    assert read["history_epochs"] == list(range(read["epoch"] + 1))
    assert read["val_loss"] == pytest.approx(outcome["best_metrics"]["val/loss"], rel=1e-5)


def test_a_worker_killed_on_the_second_node_resumes_from_the_last_checkpoint(two_nodes):
    result, _, failures = two_nodes
    # Train saw one failure; rank 1's error is its worker's death (rank 0, if listed, only lost its gloo peer).
    assert len(failures) == 1, failures
    errors = failures[0]
    assert "1" in errors and errors["1"].startswith("WorkerHealthCheckFailedError"), errors
    # The state API: exactly one Train worker died on its own (WORKER_DIED), and it is rank 1's actor.
    workers = result["workers"]
    died = [w for w in workers if w["reason"] == "WORKER_DIED"]
    assert len(died) == 1, workers
    killed = died[0]
    assert killed["actor_id"] in errors["1"] and killed["actor_id"] not in errors.get("0", "")
    assert killed["node_id"] == result["second"] != result["head"]  # it ran on the second (non-head) node
    # Two attempts of two workers, each attempt one worker per node.
    assert Counter(w["node_id"] for w in workers) == {result["head"]: 2, result["second"]: 2}, workers

    # The run resumed from epoch 1's checkpoint: epoch 1 not repeated, epoch 2 after one restart, and as many
    # optimizer steps as planned (one per epoch).
    epochs = _epochs(result["outcome"]["history"])
    assert [m["epoch"] for m in epochs] == list(range(1, EPOCHS + 1))
    assert [m["step"] for m in epochs] == list(range(1, EPOCHS + 1))
    assert epochs[0]["train/restarts"] == 0 and epochs[-1]["train/restarts"] == 1
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]  # it kept training from the restored weights
