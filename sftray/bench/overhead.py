"""Ray overhead: seconds from ``sftray train`` process start, and from a sweep's start, to the first optimizer step.

``sftray.train.loop`` records no timestamp of its first step, so the bench derives it from what a run leaves:
the epoch's checkpoint files are written right after the epoch (mtime, worker-side), and the epoch's own training
time is ``tokens / train/tokens_per_s`` (both from the checkpoint's history and the data report). So

    loop start = first checkpoint file's mtime - epoch training seconds

and the time to the first optimizer step is (loop start - process start) + one step's share of the epoch. This is
an upper bound by the epoch-end eval (8 val + 8 held-out rows, one 2-token probe) and the checkpoint write, both
well under a second here. The run is 1 worker x 1 CPU, full fine-tuning, DDP, 1 epoch, data already prepared
(cached), and joins the running Ray instance ($RAY_ADDRESS), so a cold ``ray.init`` is reported apart. Two
milestones before that come from the run's own log lines: Ray connected (Ray's timestamp, ms) and TorchTrainer
launched (sftray's "training ... on N worker(s)" line, 1 s resolution).

The sweep figure is the same measure for the single trial of a one-point sweep (``run_sweep`` called in this,
already warm, process): Tune's trial start-up plus the same TorchTrainer start-up.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sftray.bench.workload import NO_MIX, SEED, demo_conversations
from sftray.eval.metrics import TRAIN_TOKENS_PER_S

SECTION = "overhead"
TRAIN_ROW = "sftray train: process start -> first optimizer step"
TRAIN_CONNECTED_ROW = "sftray train: process start -> Ray connected (imports, config, ray.init)"
TRAIN_LAUNCH_ROW = "sftray train: process start -> TorchTrainer launched (cached data checked, datasets built)"
TRAIN_LOOP_ROW = "sftray train: process start -> training loop start (workers up, model loaded, base eval)"
TRAIN_WALL_ROW = "sftray train: whole process (1 epoch, evals, checkpoint, exit)"
SWEEP_ROW = "sweep (1 trial): run_sweep() -> first optimizer step"
RAY_INIT_ROW = "ray.init(): cold local Ray start"
RAY_TRAIN_TPS_ROW = "Ray Train path: train/tokens_per_s (1 worker x 1 CPU, whole epoch)"


def overrides(*, cache_dir: Path, out_dir: Path, chats: Path, model_dir: Path, max_seq_len: int) -> list[str]:
    """The training run both figures share: 1 worker x 1 CPU, full fine-tuning, 1 epoch, minimal evals."""
    return [
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={out_dir}",
        f"model.name_or_path={model_dir}",
        "data=files",
        f"data.sources=[{{path:'{chats}'}}]",
        f"data.max_seq_len={max_seq_len}",
        "data.val_fraction=0.1",  # a few validation rows even from ~100 conversations
        *NO_MIX,
        "train=full",
        "train.num_workers=1",
        "train.cpus_per_worker=1",
        "train.parallelism=ddp",
        "train.epochs=1",
        "train.schedule=constant",
        "train.warmup_ratio=0",
        "train.max_failures=0",
        "eval.num_probes=1",  # checkpoint selection needs eval/format_compliance; one 2-token probe is enough
        "eval.max_new_tokens=2",
        "eval.max_eval_rows=8",
        f"seed={SEED}",
    ]


def measure_overhead(
    *,
    cache_dir: Path,
    work_dir: Path,
    model_dir: Path,
    conversations: int,
    max_seq_len: int,
    sweep: bool,
    ray_init_seconds: float | None,
) -> list[dict]:
    """One ``sftray train`` subprocess and (with ``sweep``) one one-trial sweep; Ray must be initialised."""
    import ray

    from sftray.config import compose_config
    from sftray.recipes.prep import prep

    work_dir = Path(work_dir)
    for previous in ("runs", "sweeps"):  # earlier bench runs' checkpoints: the latest run must be this one
        shutil.rmtree(work_dir / "out" / previous, ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    chats = work_dir / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in demo_conversations(n=conversations)))
    args = overrides(
        cache_dir=cache_dir, out_dir=work_dir / "out", chats=chats, model_dir=model_dir, max_seq_len=max_seq_len
    )
    cfg = compose_config(args, base=work_dir)
    prepared = prep(cfg)  # cached for the runs below: they measure start-up, not data preparation
    tokens = prepared.report["splits"]["train"]["tokens"]

    rows = [
        _row(
            RAY_INIT_ROW,
            ray_init_seconds,
            note="measured by the bench CLI" if ray_init_seconds is not None else "Ray was already running",
        )
    ]

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    sftray = Path(sys.executable).with_name("sftray")
    command = [str(sftray)] if sftray.is_file() else [sys.executable, "-m", "sftray.cli"]
    log = work_dir / "train.log"
    started = time.time()
    with log.open("w") as fh:
        proc = subprocess.run([*command, "train", *args], cwd=work_dir, env=env, stdout=fh, stderr=subprocess.STDOUT)
    ended = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"sftray train failed (exit {proc.returncode}); see {log}")
    train = _first_step(sorted((work_dir / "out" / "runs").glob("train-*/epoch_01")), tokens=tokens)
    marks = _log_marks(log.read_text(), started=started)
    rows += [
        _row(TRAIN_CONNECTED_ROW, _since(marks.get("connected"), started), note="from Ray's log line (ms)"),
        _row(TRAIN_LAUNCH_ROW, _since(marks.get("launch"), started), note="from sftray's log line (+-1 s)"),
        _row(TRAIN_LOOP_ROW, train["loop_start"] - started),
        _row(TRAIN_ROW, train["first_step"] - started, note="upper bound (see sftray.bench.overhead)"),
        _row(TRAIN_WALL_ROW, ended - started),
        {
            "section": SECTION,
            "name": RAY_TRAIN_TPS_ROW,
            "value": train["tokens_per_s"],
            "unit": "tokens/s",
            "note": "epoch incl. its first step and Ray Data iteration; compare with the throughput table",
        },
    ]

    if sweep:
        from sftray.tune.sweep import run_sweep

        sweep_cfg = compose_config(
            [*args, "sweep.name=bench", "sweep.lr.values=[1e-4]", "sweep.epochs=[1]"], base=work_dir
        )
        started = time.time()
        outcome = run_sweep(sweep_cfg, prepared=prepared, base_model=str(model_dir))
        if not outcome.best:
            raise RuntimeError(f"the bench sweep's trial did not finish: {outcome.trials}")
        trial = _first_step(sorted((work_dir / "out" / "sweeps" / "runs").glob("*/bench-*/epoch_01")), tokens=tokens)
        rows.append(_row(SWEEP_ROW, trial["first_step"] - started, note="upper bound; warm driver process"))
    return rows


def _first_step(checkpoints: list[Path], *, tokens: int) -> dict[str, Any]:
    """Loop start and first-step time of the latest run, from its epoch-1 checkpoint (see the module docstring)."""
    import torch

    if not checkpoints:
        raise RuntimeError("the bench run left no epoch_01 checkpoint")
    checkpoint = max(checkpoints, key=lambda p: p.stat().st_mtime)
    written = min(f.stat().st_mtime for f in checkpoint.rglob("*") if f.is_file())
    state = torch.load(checkpoint / "train_state.pt", map_location="cpu", weights_only=False)
    epoch = next(m for m in state["history"] if m.get("epoch") == 1)
    seconds = tokens / epoch[TRAIN_TOKENS_PER_S]
    steps = max(1, int(epoch["step"]))
    loop_start = written - seconds
    return {
        "loop_start": loop_start,
        "first_step": loop_start + seconds / steps,
        "tokens_per_s": epoch[TRAIN_TOKENS_PER_S],
    }


_RAY_CONNECTED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\s+INFO worker\.py:\d+ -- Connected to Ray")
_SFTRAY_LAUNCH = re.compile(r"^(\d\d:\d\d:\d\d) INFO sftray\.train: training .* on \d+ worker")


def _log_marks(text: str, *, started: float) -> dict[str, float]:
    """Wall-clock times of milestones in the ``sftray train`` output (local time, as its log lines print it)."""
    marks: dict[str, float] = {}
    day = time.strftime("%Y-%m-%d", time.localtime(started))
    for line in text.splitlines():
        if "connected" not in marks and (m := _RAY_CONNECTED.match(line)):
            marks["connected"] = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
        elif "launch" not in marks and (m := _SFTRAY_LAUNCH.match(line)):
            stamp = time.mktime(time.strptime(f"{day} {m.group(1)}", "%Y-%m-%d %H:%M:%S"))
            marks["launch"] = stamp + 86400 if stamp < started - 1 else stamp  # the run crossed midnight
    return marks


def _since(mark: float | None, started: float) -> float | None:
    return None if mark is None else mark - started


def _row(name: str, seconds: float | None, *, note: str = "") -> dict[str, Any]:
    value = None if seconds is None or math.isnan(seconds) else seconds
    return {"section": SECTION, "name": name, "value": value, "unit": "s", "note": note}
