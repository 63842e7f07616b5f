"""``make report``'s check before it renders analysis/sweep_report.ipynb: the sweep has runs in the tracking store.

``python -m sftray.tracking.sweep_report URI SWEEP`` exits 1 with one line saying what is missing, where the
notebook would fail under a page of nbconvert traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sftray.tracking.mlflow_logger import redact


def missing(uri: str, sweep: str) -> str | None:
    """Why there is nothing to report (no store, no runs in the sweep's experiment), or None."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return f"no MLflow store at {uri}"  # asking MLflow would create an empty one
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None or not client.search_runs([experiment.experiment_id], max_results=1):
        return f"no runs in experiment {sweep!r} at {redact(uri)}"
    return None


def main(argv: list[str] | None = None) -> int:
    uri, sweep = sys.argv[1:] if argv is None else argv
    problem = missing(uri, sweep)
    if problem:
        print(problem, file=sys.stderr)
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
