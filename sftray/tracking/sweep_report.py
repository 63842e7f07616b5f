"""``make report``'s check before it renders analysis/sweep_report.ipynb: the sweep has trials in the tracking store.

``python -m sftray.tracking.sweep_report URI SWEEP`` exits 1 with one line saying what is missing, where the
notebook would fail under a page of nbconvert traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sftray.tracking.mlflow_logger import redact


def missing(uri: str, sweep: str) -> str | None:
    """Why there is nothing to report (no store, no runs in the sweep's experiment, no sweep run there, no trial in
    its latest sweep run: what the notebook plots), or None."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return f"no MLflow store at {uri}"  # asking MLflow would create an empty one
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(sweep)
    where = f"experiment {sweep!r} at {redact(uri)}"
    if experiment is None or not client.search_runs([experiment.experiment_id], max_results=1):
        return f"no runs in {where}"
    ids = [experiment.experiment_id]
    parents = client.search_runs(
        ids, filter_string="tags.`sftray.role` = 'sweep'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not parents:
        roles = sorted({r.data.tags.get("sftray.role", "untagged") for r in client.search_runs(ids, max_results=100)})
        return (
            f"no sweep in {where} (its runs: {', '.join(roles)}): the report plots one sweep's trials; "
            "give SWEEP=<a sweep's name> (sweep.name), and browse other runs with make mlflow-ui"
        )
    parent = parents[0].info.run_id
    if not client.search_runs(ids, filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1):
        return f"the latest sweep in {where} started no trial: nothing to plot yet"
    return None


def main(argv: list[str] | None = None) -> int:
    uri, sweep = sys.argv[1:] if argv is None else argv
    problem = missing(uri, sweep)
    if problem:
        print(problem, file=sys.stderr)
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
