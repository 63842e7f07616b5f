"""The pipeline on a two-node Ray cluster (simulated on this machine) writes the same rows as on one node.

The cluster (``ray.cluster_utils.Cluster``: a head and a second node, one CPU each, their own raylets and object
stores) runs in a subprocess, since a process joins one Ray at a time; both preps write to one shared folder,
as a real cluster writes to shared storage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sftray.bench.workload import demo_conversations
from sftray.config import compose_config
from sftray.recipes.prep import prep

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TWO_NODES = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from sftray.config import compose_config
from sftray.recipes.prep import prep

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
try:
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    nodes = len([n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")])
    prepared = prep(compose_config(json.loads(sys.argv[1]), base=sys.argv[2]), force=True)
    print(json.dumps({"out_dir": str(prepared.out_dir), "nodes": nodes}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def _rows(folder: Path) -> list[tuple]:
    """Every stored row of a split, as a sorted list (Parquet file order is not part of the output)."""
    rows = []
    for f in sorted(folder.glob("*.parquet")):
        for r in pq.read_table(f).to_pylist():
            rows.append(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(r.items())))
    return sorted(rows)


def test_two_node_cluster_writes_the_same_rows_as_one_node(ray_local, cache_dir, tmp_path):
    chats = tmp_path / "chats.jsonl"
    # ~1.1 MB: cut into several pieces, so both nodes' actors get work
    chats.write_text("".join(json.dumps(c) + "\n" for c in demo_conversations(n=6000)))
    shared = tmp_path / "shared"
    overrides = [
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={shared}",
        "data=files",
        f"data.sources=[{{path:'{chats}'}}]",
        "data.pack_group_size=512",  # several pack groups per split
    ]
    one = prep(compose_config(overrides, base=tmp_path), force=True)
    expected = {split: _rows(one.out_dir / split) for split in ("train", "val", "pretrain_heldout")}
    copy = tmp_path / "one-node"
    one.out_dir.rename(copy)

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", TWO_NODES, json.dumps(overrides), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    two = Path(result["out_dir"])
    assert two == one.out_dir  # same inputs and knobs: same fingerprint, same folder on the shared storage
    assert result["nodes"] == 2
    for split, rows in expected.items():
        assert rows, split
        assert _rows(two / split) == rows, split
    report = json.loads((two / "report.json").read_text())
    assert report["splits"] == json.loads((copy / "report.json").read_text())["splits"]
