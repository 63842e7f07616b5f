"""The default trial layout on a 2-CPU Ray: one-worker trials in their own processes, two at once, and a third that
Tune runs in a process an earlier trial used (``reuse_actors``). Every trial leaves its own outcome in its own
trial folder: in a reused process, Ray's ``get_trial_dir()`` names the trial's working directory under the Ray
session folder instead, where the outcome was lost (the sweep then called the trial stopped)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftray.config import compose_config
from sftray.eval.outcome import read_outcome
from sftray.recipes.sweep import sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
LRS = (1e-3, 2e-3, 3e-3)


def test_a_trial_in_a_reused_process_leaves_its_outcome_in_its_own_folder(
    ray_local, cache_dir, tmp_path, random_base, write_sums
):
    data = write_sums(tmp_path / "chats.jsonl", range(24))
    val = write_sums(tmp_path / "val.jsonl", range(30, 34))
    cfg = compose_config(
        [
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={tmp_path / 'out'}",
            f"model.name_or_path={random_base}",
            "data=files",
            f"data.sources=[{{path:'{data}'}}]",
            f"data.val_sources=[{{path:'{val}'}}]",
            "data.max_seq_len=64",
            "mix.ratio=0",
            "eval.num_probes=2",
            "eval.max_new_tokens=2",
            "sweep.name=reused",
            f"sweep.lr.values=[{','.join(map(str, LRS))}]",
            "sweep.epochs=[1]",
        ],
        conf=ROOT / "conf",
        base=tmp_path,
    )
    assert ray_local.cluster_resources()["CPU"] == 2  # two 1-CPU trials at once: the third waits for a process
    outcome = sweep(cfg)
    assert [r["status"] for r in outcome.trials] == ["finished"] * 3, outcome.trials
    seen = {}
    for row in outcome.trials:
        record = read_outcome(row["path"])
        assert record is not None and Path(record["run_path"]).name.endswith(row["trial_id"]), row
        seen[record["overrides"]["train.lr"]] = row["trial_id"]
    assert sorted(seen) == list(LRS)  # each trial's own outcome, none overwritten by another's
    pids = {row["trial_id"]: row["pid"] for row in outcome.trials}
    assert len(set(pids.values())) < len(pids), pids  # a process ran two trials: the case under test happened
