"""The default sweep, timed: how soon each trial trains, and what share of the sweep's wall time is not training
or eval.

The sweep is ``make sweep``'s own (``sftray.recipes.sweep``: prep, base model, MLflow parent and per-trial
tracking, Tune trials with ``sweep.every_trial``), composed from the default config with only the output folders
and the sweep's name set; size ``smoke`` shortens it (``BenchSize.sweep_overrides``). It joins the bench's running
Ray, with the data already prepared and the base model built, as a user's second ``make sweep`` does.

- ``sweep_trial_first_step_s``: for each trial, from the start time Tune records for it (``Trial.run_metadata.
  start_time``, set when Tune marks it RUNNING: its process is placed and started) to the first optimizer step of
  its training loop (the wall-clock mark in its epoch 1 checkpoint). The first trials pay the trial processes'
  imports; the figure is the slowest trial that started after the first one had finished.
- ``sweep_overhead_share``: 1 - (sum over trials of seconds in training steps and evals) / (the sweep's wall time
  x the trials that run at once). Training seconds are each epoch's ``train/seconds`` (first micro-batch to last
  step), evals every ``eval/seconds`` (the base model's included). The trials that run at once are what Tune
  was given (``trial_resources``), so the share counts the time a slot sat idle or starting as overhead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sftray.eval.metrics import EVAL_SECONDS, TRAIN_SECONDS
from sftray.layout import EPOCH_GLOB, sweeps_dir

SECTION = "sweep"
FIRST_ROW = "sweep: Tune's trial start -> first optimizer step, first trial"
LATER_ROW = "sweep: Tune's trial start -> first optimizer step, slowest later trial"
WALL_ROW = "sweep: whole sweep (prep cached, base built, tracking on)"
BUSY_ROW = "sweep: trial seconds in training steps and evals (sum)"
SHARE_ROW = "sweep: overhead share of the trial slots' time"
SUMMARY_KEYS = ("sweep_trial_first_step_s", "sweep_overhead_share")
NAME = "bench"


def measure_sweep(
    *, cache_dir: Path, work_dir: Path, extra: tuple[str, ...] = ()
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Runs the default sweep (plus ``extra`` overrides) and returns its rows and this part's summary."""
    import shutil

    from sftray.config import compose_config
    from sftray.recipes.prep import prep
    from sftray.recipes.sweep import sweep
    from sftray.tune.sweep import trial_resources, with_every_trial

    out = Path(work_dir) / "out"
    shutil.rmtree(sweeps_dir(out), ignore_errors=True)  # an earlier bench's trials would be resumed or mixed in
    overrides = [f"paths.cache_dir={cache_dir}", f"paths.output_dir={out}", f"sweep.name={NAME}", *extra]
    cfg = compose_config(overrides, base=Path(work_dir))
    prep(with_every_trial(cfg))  # cached before the clock starts: a user's second sweep finds it
    starts = _TrialStarts()
    started = time.time()
    outcome = sweep(cfg, callbacks=[starts.callback()])
    wall = time.time() - started
    import ray

    _, slots = trial_resources(with_every_trial(cfg), cluster=ray.cluster_resources())
    trials = _trial_timings(outcome.trials, starts.seen)
    return rows_and_summary(trials, wall=wall, slots=slots)


def rows_and_summary(trials: list[dict[str, float]], *, wall: float, slots: int) -> tuple[list[dict], dict]:
    """The part's rows and summary from each trial's timings (``start``, ``first_step``, ``ended``, ``busy``:
    wall-clock seconds since the epoch, and seconds), the sweep's wall time and its concurrent trial slots."""
    if len(trials) < 2:
        raise RuntimeError(f"the bench sweep needs at least 2 trials, it ran {len(trials)}")
    trials = sorted(trials, key=lambda t: t["start"])
    first_end = trials[0]["ended"]
    later = [t for t in trials[1:] if t["start"] >= first_end] or trials[1:]
    delays = [t["first_step"] - t["start"] for t in later]
    busy = sum(t["busy"] for t in trials)
    share = 1.0 - busy / (wall * slots)
    rows = [
        _row(FIRST_ROW, trials[0]["first_step"] - trials[0]["start"], "s", "includes the trial process's imports"),
        _row(LATER_ROW, max(delays), "s", f"{len(delays)} later trials: " + ", ".join(f"{d:.1f}" for d in delays)),
        _row(WALL_ROW, wall, "s", f"{len(trials)} trials, {slots} at once"),
        _row(BUSY_ROW, busy, "s", "train/seconds + eval/seconds of every epoch"),
        _row(SHARE_ROW, share, "share", f"1 - {busy:.1f} / ({wall:.1f} s x {slots} slots)"),
    ]
    return rows, {"sweep_trial_first_step_s": float(max(delays)), "sweep_overhead_share": float(share)}


class _TrialStarts:
    """Tune's recorded start time of each trial, by trial id: a Tune callback in this process keeps the trials it
    saw start (Tune sets ``run_metadata.start_time`` just after it calls ``on_trial_start``)."""

    def __init__(self) -> None:
        self._trials: dict[str, Any] = {}

    def callback(self) -> Any:
        from ray import tune

        started = self._trials

        class RecordStart(tune.Callback):
            def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                started[trial.trial_id] = trial

        return RecordStart()

    @property
    def seen(self) -> dict[str, float]:
        return {i: t.run_metadata.start_time for i, t in self._trials.items() if t.run_metadata.start_time}


def _trial_timings(rows: list[dict], starts: dict[str, float]) -> list[dict[str, float]]:
    import torch

    from sftray.eval.outcome import read_outcome

    timings = []
    for row in rows:
        record = read_outcome(row["path"]) if row.get("path") else None
        if record is None or row["trial_id"] not in starts:
            raise RuntimeError(f"a bench sweep trial did not finish: {row}")
        epochs = sorted(Path(record["run_path"]).glob(EPOCH_GLOB))
        state = torch.load(epochs[0] / "train_state.pt", map_location="cpu", weights_only=False)
        history = record["history"]
        busy = sum(m.get(TRAIN_SECONDS, 0.0) + m.get(EVAL_SECONDS, 0.0) for m in history)
        timings.append(
            {
                "start": starts[row["trial_id"]],
                "first_step": state["timing"]["first_step_at"],
                "ended": record["finished_at"],
                "busy": busy,
            }
        )
    return timings


def _row(name: str, value: float, unit: str, note: str) -> dict[str, Any]:
    return {"section": SECTION, "name": name, "value": value, "unit": unit, "note": note}
