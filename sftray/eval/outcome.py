"""The outcome contract of a sweep trial: the objective Tune ranks by, a trial row's metric columns, and the
outcome file a finished trial leaves in its Tune trial folder (its writer and its reader).

Ray-free and torch-free: the trial body (``sftray.recipes.trial``) writes the file, the Tune adapter
(``sftray.tune.sweep``) and MLflow tracking (``sftray.tracking``) read it, each through this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftray.eval.metrics import EXACT_MATCH, FORGETTING, FORMAT_COMPLIANCE, SCORE, VAL_LOSS

OBJECTIVE = SCORE
"""The metric Tune ranks trials by (in the direction of ``sftray.eval.metrics.OBJECTIVE_MODE``)."""
OUTCOME_FILE = "outcome.json"
"""Written by each trial into its Tune trial folder: best checkpoint, why, and the metric history."""
ROW_METRICS = {
    "val_loss": VAL_LOSS,
    "format_compliance": FORMAT_COMPLIANCE,
    "exact_match": EXACT_MATCH,
    "forgetting": FORGETTING,
}
"""Metric columns of a trial row (``SweepOutcome.trials``) -> the metric each holds: the selected epoch's value
(the last report's for a trial that did not finish)."""


def write_outcome(trial_dir: str | Path, record: dict[str, Any]) -> None:
    """Leaves a finished trial's outcome (``record``) in its Tune trial folder."""
    (Path(trial_dir) / OUTCOME_FILE).write_text(json.dumps(record, indent=1, default=str))


def read_outcome(trial_dir: str | Path) -> dict[str, Any] | None:
    """The outcome a trial left in its Tune trial folder (``OUTCOME_FILE``), or None if it did not finish."""
    path = Path(trial_dir) / OUTCOME_FILE
    return json.loads(path.read_text()) if path.is_file() else None
