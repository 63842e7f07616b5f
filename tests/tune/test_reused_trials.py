"""The default trial layout on a 2-CPU Ray: one-worker trials in their own processes, two at once, and a third that
Tune runs in a process an earlier trial used (``reuse_actors``).

- Every trial leaves its own outcome in its own trial folder: in a reused process, Ray's ``get_trial_dir()`` names
  the trial's working directory under the Ray session folder instead, where the outcome was lost (the sweep then
  called the trial stopped).
- A swept data key gives each trial its own prepared data, made before the trials start: made inside two trials
  that held both CPUs, its Ray Data tasks waited for a CPU forever (the sweep hung)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftray.config import compose_config
from sftray.eval.outcome import read_outcome
from sftray.recipes.sweep import sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SEQ_LENS = (64, 96, 128)


@pytest.mark.timeout(300)  # the hang this guards against would otherwise block the suite
def test_trials_with_their_own_data_run_side_by_side_and_in_reused_processes(
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
            "sweep.lr.values=[1e-3]",
            "sweep.seeds=[0]",
            "sweep.epochs=[1]",
            f"+sweep.params={{data.max_seq_len: [{','.join(map(str, SEQ_LENS))}]}}",
        ],
        conf=ROOT / "conf",
        base=tmp_path,
    )
    assert ray_local.cluster_resources()["CPU"] == 2  # two 1-CPU trials at once: the third waits for a process
    outcome = sweep(cfg)
    assert [r["status"] for r in outcome.trials] == ["finished"] * 3, outcome.trials
    seen, reports = {}, set()
    for row in outcome.trials:
        record = read_outcome(row["path"])
        assert record is not None and Path(record["run_path"]).name.endswith(row["trial_id"]), row
        seen[record["overrides"]["data.max_seq_len"]] = row["trial_id"]
        reports.add(record["data_report"])
    assert sorted(seen) == list(SEQ_LENS)  # each trial's own outcome, none overwritten by another's
    assert len(reports) == len(SEQ_LENS)  # each trained on its own prepared data
    pids = {row["trial_id"]: row["pid"] for row in outcome.trials}
    assert len(set(pids.values())) < len(pids), pids  # a process ran two trials: the case under test happened
