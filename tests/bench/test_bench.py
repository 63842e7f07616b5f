"""The bench at its smallest size on the shared Ray instance: every part produces every row, with
plausible values (the figures themselves are the bench's job, not the test's)."""

from __future__ import annotations

import json

import pytest

from sftray.bench import memory, overhead, packing, preprocess, throughput
from sftray.bench.run import PARTS, run_bench
from sftray.bench.sizes import get_size

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_smoke_bench_writes_every_row(ray_local, cache_dir, tmp_path):
    size = get_size("smoke")
    results = run_bench(size=size, out_dir=tmp_path, cache_dir=cache_dir)

    names = {part: [r["name"] for r in results[part]] for part in PARTS}
    cells = {(r["dataset"], r["max_seq_len"], r["name"]) for r in results["packing"]}
    assert cells == {(d, n, m) for d in ("demo", "synthetic") for n in size.packing_seq_lens for m in packing.METHODS}
    assert names["throughput"] == list(throughput.CONFIGS)
    assert all(r["ratio_to_trl_best"] > 0 for r in results["throughput"])
    assert names["preprocess"] == preprocess.row_names()
    summary = results["summary"]
    assert set(preprocess.SUMMARY_KEYS) <= set(summary) and summary["prep_summary_size"] == size.prep_conversations
    assert all(isinstance(summary[k], float) and summary[k] > 0 for k in preprocess.SUMMARY_KEYS), summary
    # Overhead: every milestone of the `sftray train` process was measured, in order, before the process ended; the
    # Ray Train path trained at some rate and the sweep's trial reached its first step. The ray.init row is there
    # (its value is None here: Ray was already up).
    values = {r["name"]: r["value"] for r in results["overhead"]}
    connected, loop, first_step, wall = (
        values[overhead.TRAIN_CONNECTED_ROW],
        values[overhead.TRAIN_LOOP_ROW],
        values[overhead.TRAIN_ROW],
        values[overhead.TRAIN_WALL_ROW],
    )
    assert 0 < connected < loop < first_step < wall, values
    assert 0 < values[overhead.TRAIN_LAUNCH_ROW] < wall, values
    assert values[overhead.RAY_TRAIN_TPS_ROW] > 0 and values[overhead.SWEEP_ROW] > 0, values
    assert overhead.RAY_INIT_ROW in values
    assert [r["method"] for r in results["memory"]] == list(memory.METHODS)

    # The JSON holds what run_bench returned; the markdown has a row for every measured figure.
    assert json.loads((tmp_path / "bench.json").read_text()).keys() == {"meta", "summary", *PARTS}
    table = (tmp_path / "bench.md").read_text()
    for part in PARTS:
        for name in names[part]:
            assert f"| {name} |" in table, name
