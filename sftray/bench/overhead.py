"""The Ray Train path: seconds from ``sftray train`` (and a sweep trial) to the first optimizer step, and its training
throughput next to the in-process step code on the very same rows.

Every run joins the bench's running Ray ($RAY_ADDRESS) with its data already prepared (cached): the figures are
what a user pays per run and per trial, not a cold cluster (a cold ``ray.init`` is reported apart). The 2-worker
run goes first and computes the base model's eval; the 1-worker run, whose start-up is ``first_step_s_warm``, reads
it from the cache as a user's second run does (the bench fails if it did not). The worker
loop writes wall-clock marks into each epoch checkpoint's ``train_state.pt`` (``timing``: epoch start, first
optimizer step), so the milestones are read, not derived. Two earlier milestones come from the run's own log
lines: Ray connected (Ray's timestamp, ms) and TorchTrainer launched (sftray's "training ... on N worker(s)" line,
1 s resolution).

Throughput: ``sftray train`` runs ``EPOCHS`` epochs, 1 worker x 1 CPU (DDP) and 2 workers x 1 CPU (FSDP2); its
figure is ``train/target_tokens_per_s`` (trained tokens from an epoch's first micro-batch to its last step), median
over the epochs after the first (the first warms thread pools and the allocator, as the in-process side's warm-up
epoch does). The in-process reference trains the same model on the same prepared rows with the loop's own pieces
(``grouped_micro_batches``, ``collate_rows``, ``build_optimizer``, ``optimizer_step``), with 1 thread, and with 2
threads at the 2-worker run's global batch (grad_accum 2), without Ray. ``train_ray_over_in_process`` is the lower
of the two ratios.

The sweep figure: a sweep of ``SWEEP_TRIALS`` one-epoch trials (one at a time on 2 CPUs); for each trial, seconds
from the trial function's start to its first optimizer step. The first trial also pays the worker processes'
first imports; ``sweep_trial_first_step_s`` is the slowest of the later ones.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sftray.bench.workload import NO_MIX, SEED, demo_conversations
from sftray.eval.metrics import BASE_EVAL_REUSED, TRAIN_TARGET_TOKENS_PER_S
from sftray.layout import EPOCH_GLOB, runs_dir, sweeps_dir

SECTION = "overhead"
TRAIN_ROW = "sftray train: process start -> first optimizer step"
TRAIN_CONNECTED_ROW = "sftray train: process start -> Ray connected (imports, config, ray.init)"
TRAIN_LAUNCH_ROW = "sftray train: process start -> TorchTrainer launched (cached data checked, datasets built)"
TRAIN_LOOP_ROW = "sftray train: process start -> training loop start (workers up, model loaded, base eval read)"
TRAIN_WALL_ROW = "sftray train: whole process (3 epochs, evals, checkpoints, exit)"
RAY_TPS_1 = "Ray Train path, 1 worker x 1 CPU (DDP): target tokens/s"
IN_PROCESS_TPS_1 = "in-process step code, 1 thread, same rows: target tokens/s"
RAY_TPS_2 = "Ray Train path, 2 workers x 1 CPU (FSDP2): target tokens/s"
IN_PROCESS_TPS_2 = "in-process step code, 2 threads, same rows and global batch: target tokens/s"
SWEEP_FIRST_ROW = "sweep: trial start -> first optimizer step, first trial"
SWEEP_ROW = "sweep: trial start -> first optimizer step, slowest later trial"
SWEEP_WALL_ROW = "sweep: whole run_sweep()"
RAY_INIT_ROW = "ray.init(): cold local Ray start"
EPOCHS = 3
SWEEP_TRIALS = 3
SUMMARY_KEYS = ("first_step_s_warm", "sweep_trial_first_step_s", "train_ray_over_in_process")
"""This part's keys of the bench's top-level summary (``train_ray_over_best_trl`` joins it with the throughput
part's ``train_in_process_over_best_trl`` in ``sftray.bench.run``)."""


def overrides(
    *, cache_dir: Path, out_dir: Path, chats: Path, model_dir: Path, max_seq_len: int, workers: int = 1
) -> list[str]:
    """The training run every figure shares: full fine-tuning, 1 CPU per worker, minimal evals."""
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
        f"train.num_workers={workers}",
        "train.cpus_per_worker=1",
        f"train.parallelism={'ddp' if workers == 1 else 'fsdp'}",
        f"train.epochs={EPOCHS}",
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
) -> tuple[list[dict], dict[str, float]]:
    """Rows and this part's summary figures; Ray must be initialised (the runs join it)."""
    from sftray.config import compose_config
    from sftray.recipes.prep import prep

    work_dir = Path(work_dir)
    # Earlier bench runs' checkpoints go: every run read below must be this one's.
    for previous in (runs_dir(work_dir / "out"), sweeps_dir(work_dir / "out")):
        shutil.rmtree(previous, ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    chats = work_dir / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in demo_conversations(n=conversations)))

    def args(workers: int) -> list[str]:
        return overrides(
            cache_dir=cache_dir,
            out_dir=work_dir / "out",
            chats=chats,
            model_dir=model_dir,
            max_seq_len=max_seq_len,
            workers=workers,
        )

    cfg = compose_config(args(1), base=work_dir)
    prepared = prep(cfg)  # cached for every run below: they measure training, not data preparation
    rows = [
        _row(
            RAY_INIT_ROW,
            ray_init_seconds,
            note="measured by the bench CLI" if ray_init_seconds is not None else "Ray was already running",
        )
    ]

    # The 2-worker run goes first: it computes the base model's eval, which every later run with the same base, data
    # and eval config reads from the cache (its key does not depend on the worker count), so the 1-worker run's
    # start-up is a user's second run: Ray up, data prepared, base eval cached.
    two = _sftray_train(args(2), work_dir=work_dir, label="2x1")
    one = _sftray_train(args(1), work_dir=work_dir, label="1x1")
    if not one["base_reused"]:
        raise RuntimeError("the 1-worker run computed the base model's eval: its start-up would not be a warm one")
    local_one = _in_process(prepared, cfg=cfg, model_dir=model_dir, threads=1, grad_accum=1)
    local_two = _in_process(prepared, cfg=cfg, model_dir=model_dir, threads=2, grad_accum=2)
    rows += [
        _row(TRAIN_CONNECTED_ROW, _since(one["marks"].get("connected"), one["started"]), note="Ray's log line (ms)"),
        _row(TRAIN_LAUNCH_ROW, _since(one["marks"].get("launch"), one["started"]), note="sftray's log line (+-1 s)"),
        _row(TRAIN_LOOP_ROW, one["loop_start"] - one["started"]),
        _row(TRAIN_ROW, one["first_step"] - one["started"]),
        _row(TRAIN_WALL_ROW, one["ended"] - one["started"]),
        _tps(RAY_TPS_1, one["tps"], note=f"median of epochs 2-{EPOCHS}"),
        _tps(IN_PROCESS_TPS_1, local_one, note=f"median of epochs 2-{EPOCHS}"),
        _tps(RAY_TPS_2, two["tps"], note=f"median of epochs 2-{EPOCHS}"),
        _tps(IN_PROCESS_TPS_2, local_two, note=f"median of epochs 2-{EPOCHS}"),
    ]
    summary = {
        "first_step_s_warm": one["first_step"] - one["started"],
        "train_ray_over_in_process": min(
            statistics.median(one["tps"]) / statistics.median(local_one),
            statistics.median(two["tps"]) / statistics.median(local_two),
        ),
    }
    if sweep:
        trials, wall = _sweep(args(1), prepared=prepared, model_dir=model_dir, work_dir=work_dir)
        later = trials[1:]
        rows += [
            _row(SWEEP_FIRST_ROW, trials[0], note="includes the worker processes' first imports"),
            _row(SWEEP_ROW, max(later), note=f"{len(later)} later trials: " + ", ".join(f"{t:.1f}" for t in later)),
            _row(SWEEP_WALL_ROW, wall, note=f"{SWEEP_TRIALS} one-epoch trials, one at a time"),
        ]
        summary["sweep_trial_first_step_s"] = max(later)
    return rows, summary


def _sftray_train(args: list[str], *, work_dir: Path, label: str) -> dict[str, Any]:
    """One ``sftray train`` process on the bench's Ray: its milestones and per-epoch target tokens/s."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    sftray = Path(sys.executable).with_name("sftray")
    command = [str(sftray)] if sftray.is_file() else [sys.executable, "-m", "sftray.cli"]
    log = work_dir / f"train-{label}.log"
    runs = runs_dir(work_dir / "out")
    shutil.rmtree(runs, ignore_errors=True)
    started = time.time()
    with log.open("w") as fh:
        proc = subprocess.run([*command, "train", *args], cwd=work_dir, env=env, stdout=fh, stderr=subprocess.STDOUT)
    ended = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"sftray train failed (exit {proc.returncode}); see {log}")
    epochs = _epoch_states(sorted(runs.glob(f"train-*/{EPOCH_GLOB}")))
    return {
        "started": started,
        "ended": ended,
        "marks": _log_marks(log.read_text(), started=started),
        "base_reused": any(m.get(BASE_EVAL_REUSED) for m in epochs[1]["history"] if m.get("epoch") == 0),
        "loop_start": epochs[1]["timing"]["epoch_started_at"],
        "first_step": epochs[1]["timing"]["first_step_at"],
        "tps": [
            _epoch_metrics(state, epoch)[TRAIN_TARGET_TOKENS_PER_S] for epoch, state in epochs.items() if epoch > 1
        ],
    }


def _sweep(args: list[str], *, prepared: Any, model_dir: Path, work_dir: Path) -> tuple[list[float], float]:
    """Seconds from each trial's start to its first optimizer step (in start order), and the sweep's wall time."""
    from sftray.config import compose_config
    from sftray.eval.outcome import read_outcome
    from sftray.recipes.trial import run_trial
    from sftray.tune.sweep import run_sweep

    lrs = ", ".join(f"{1e-4 * (i + 1):g}" for i in range(SWEEP_TRIALS))
    cfg = compose_config(
        [*args, "train.epochs=1", "sweep.name=bench", f"sweep.lr.values=[{lrs}]", "sweep.epochs=[1]"], base=work_dir
    )
    started = time.time()
    outcome = run_sweep(cfg, trial=run_trial, prepared=prepared, base_model=str(model_dir))
    wall = time.time() - started
    trials = []
    for trial in outcome.trials:
        record = read_outcome(trial["path"]) if trial.get("path") else None
        if record is None:
            raise RuntimeError(f"a bench sweep trial did not finish: {trial}")
        first = _epoch_states(sorted(Path(record["run_path"]).glob(EPOCH_GLOB)))[1]["timing"]["first_step_at"]
        trials.append((record["started_at"], first - record["started_at"]))
    return [seconds for _, seconds in sorted(trials)], wall


def _epoch_states(checkpoints: list[Path]) -> dict[int, dict[str, Any]]:
    """epoch -> ``train_state.pt`` of a run's epoch checkpoints."""
    import torch

    if not checkpoints:
        raise RuntimeError("the bench run left no epoch checkpoint")
    states = {}
    for folder in checkpoints:
        state = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=False)
        states[int(state["epoch"])] = state
    return states


def _epoch_metrics(state: dict[str, Any], epoch: int) -> dict[str, Any]:
    return next(m for m in state["history"] if m.get("epoch") == epoch and TRAIN_TARGET_TOKENS_PER_S in m)


def _in_process(prepared: Any, *, cfg: Any, model_dir: Path, threads: int, grad_accum: int) -> list[float]:
    """Target tokens/s of epochs 2..EPOCHS of the loop's step code in this process on the prepared training rows
    (shuffled per epoch, length-grouped micro-batches, the run's micro-batch size and optimizer)."""
    from functools import partial

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from sftray.data.collate import collate_rows, micro_batches
    from sftray.models.loading import load_model
    from sftray.train.step import StepSum, build_optimizer, optimizer_step

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
        table = pa.concat_tables([pq.read_table(f) for f in sorted(prepared.train_dir.glob("*.parquet"))])
        torch.manual_seed(cfg.seed)
        model, _ = load_model(str(model_dir), tokenizer=tokenizer, trust_remote_code=False)
        model.train()
        optimizer = build_optimizer(model.parameters(), cfg=cfg.train)
        collate = partial(collate_rows, pad_id=tokenizer.pad_token_id, packed=cfg.data.packing)
        size, device, rates = cfg.train.micro_batch_size, torch.device("cpu"), []
        for epoch in range(1, EPOCHS + 1):
            # the loop's own epoch: a fresh permutation of every row, length-grouped micro-batches
            batches = micro_batches(table, rank=0, world=1, size=size, collate=collate, seed=cfg.seed + epoch)
            group = [next(batches, None) for _ in range(grad_accum)]
            started, targets = time.perf_counter(), 0  # from the first micro-batch, as the loop counts
            while group and group[0] is not None:
                group = [b for b in group if b is not None]
                sums = optimizer_step(model, optimizer, group, cfg=cfg.train, device=device, world=1, bf16=False)
                targets += int(sums[StepSum.TARGETS])
                group = [next(batches, None) for _ in range(grad_accum)]
            if epoch > 1:
                rates.append(targets / (time.perf_counter() - started))
        return rates
    finally:
        torch.set_num_threads(saved_threads)


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


def layout_rows(threads: int) -> tuple[str, str]:
    """(Ray Train path row, in-process row) of the layout with ``threads`` CPUs: 1 worker x 1 CPU vs 1 thread, or
    2 FSDP workers x 1 CPU vs 2 threads."""
    if threads not in (1, 2):
        raise ValueError(f"the Ray Train path is measured at 1 and 2 CPUs, not {threads}")
    return (RAY_TPS_1, IN_PROCESS_TPS_1) if threads == 1 else (RAY_TPS_2, IN_PROCESS_TPS_2)


def _row(name: str, seconds: float | None, *, note: str = "") -> dict[str, Any]:
    value = None if seconds is None or math.isnan(seconds) else seconds
    return {"section": SECTION, "name": name, "value": value, "unit": "s", "note": note}


def _tps(name: str, rates: list[float], *, note: str) -> dict[str, Any]:
    return {
        "section": SECTION,
        "name": name,
        "value": statistics.median(rates),
        "values": rates,
        "unit": "tokens/s",
        "note": note,
    }
