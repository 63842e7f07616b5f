"""What a trial body uses from inside its Tune trial: the trial's id and folder, and its Train run's reports
forwarded to Tune."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sftray.tune.reports import ReportsToQueue


def current_trial(sweep_folder: Path) -> tuple[str, Path]:
    """This Tune trial's id and its trial folder (where the trial leaves its outcome) in ``sweep_folder``.

    The folder is the sweep's own plus the trial folder's name. Ray 2.60's ``get_trial_dir()`` names a staging
    folder under the Ray session that Tune syncs to the sweep's folder later, and in a process Tune reuses for a
    later trial (``reuse_actors``) another one whose files never reached it: the outcome was lost there.
    """
    import ray.tune

    ctx = ray.tune.get_context()
    return ctx.get_trial_id(), Path(sweep_folder) / Path(ctx.get_trial_dir()).name


def reporting_to_tune(run: Callable[[list], Any]) -> Any:
    """``run(callbacks)`` (a training run or a chain of them) with every Train report passed on to Tune, in
    order, from this trial's own thread.

    Ray's ``TuneReportCallback`` forwards reports from the Tune trial's main thread. When a report is still in
    flight as the trial function returns, Tune's final "done" marker fills the one-slot result queue first and the
    forwarding blocks forever (seen on a loaded 2-CPU machine). Here the Train controller only enqueues, and the
    trial function itself calls ``ray.tune.report`` for each item until training has ended and the queue is empty.
    """
    import queue as stdlib_queue
    import threading

    import ray.tune
    from ray.util.queue import Empty, Queue

    reports = Queue(actor_options={"num_cpus": 0})
    done: stdlib_queue.Queue = stdlib_queue.Queue()

    def train() -> None:
        try:
            done.put((run([ReportsToQueue(reports)]), None))
        except BaseException as exc:  # handed to the trial thread, which raises it
            done.put((None, exc))

    worker = threading.Thread(target=train, name="sftray-train", daemon=True)
    worker.start()
    while worker.is_alive() or not reports.empty():
        try:
            ray.tune.report(reports.get(timeout=1.0))
        except Empty:
            continue
    outcome, error = done.get()
    if error is not None:
        raise error
    return outcome
