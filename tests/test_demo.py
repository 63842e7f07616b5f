"""The embedded demo end to end through the CLI: the default training run teaches the chat format.

The builtin base is pretrained into the test cache with a smaller budget than `make pretrain` (same code, fewer
steps) so the suite stays within its time budget; everything else is the default configuration.
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from sftray.config import EvalConfig
from sftray.eval.intervals import wilson
from sftray.eval.metrics import FORGETTING, FORMAT_COMPLIANCE
from sftray.models.pretrain import ensure_tiny_model
from sftray.train.checkpoint import load_state

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_default_demo_run_learns_the_format_and_reports_forgetting(ray_local, cache_dir, tmp_path, capsys, monkeypatch):
    ensure_tiny_model(cache_dir, steps=200, seq_len=128, batch_size=8)
    monkeypatch.chdir(tmp_path)
    assert main(["train", f"paths.cache_dir={cache_dir}"]) == 0
    out = capsys.readouterr().out
    # The rule names the metric; whether it reads "highest ..." or "... tied at ..." depends on the epochs' scores.
    assert "best checkpoint:" in out and "eval/format_compliance" in out.split("chosen for: ")[1].splitlines()[0]
    (run,) = (tmp_path / "outputs" / "runs").iterdir()
    best = Path(out.split("best checkpoint: ")[1].split()[0])
    assert best.parent == run
    base_table = json.loads((best / "probes_base.json").read_text())
    tuned_table = json.loads((best / "probes.json").read_text())
    base = sum(r["compliant"] for r in base_table) / len(base_table)
    tuned = sum(r["compliant"] for r in tuned_table) / len(tuned_table)
    assert len(tuned_table) == 64  # eval.num_probes unseen prompts
    assert tuned >= base + 0.5, (base, tuned)  # well above the base model
    lines = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in lines] == ["0", "1", "2"]  # base eval, then both epochs
    assert all(row[-1].endswith("%") for row in lines)  # forgetting is reported for every eval
    # The selected epoch is the rule's: the most compliant within the forgetting budget (else the least forgetting).
    # A more compliant epoch over the budget is passed over, so the rule reads the exact figures, not the table's.
    history = [m for m in load_state(max(run.glob("epoch_*")))["history"] if m["epoch"] > 0]
    budget = EvalConfig().forgetting_budget
    within = [m for m in history if m[FORGETTING] <= budget]
    pick = max(within, key=lambda m: m[FORMAT_COMPLIANCE]) if within else min(history, key=lambda m: m[FORGETTING])
    assert tuned == pytest.approx(pick[FORMAT_COMPLIANCE], abs=1e-9), (history, tuned)
    # Every epoch's compliance comes with the Wilson 95% interval of its 64 probes.
    compliant = sum(r["compliant"] for r in tuned_table)
    lo, hi = pick[f"{FORMAT_COMPLIANCE}_lo"], pick[f"{FORMAT_COMPLIANCE}_hi"]
    assert (lo, hi) == pytest.approx(wilson(compliant, 64)) and lo <= tuned <= hi and hi - lo > 0.05
