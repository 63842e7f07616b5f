"""The Ray Train path: seconds from ``sftray train`` to the first optimizer step, and its training throughput next
to the in-process step code and TRL's best configuration on the very same rows.

Every run joins the bench's running Ray ($RAY_ADDRESS) with its data already prepared (cached): the figures are
what a user pays per run, not a cold cluster (a cold ``ray.init`` is reported apart). The first run computes the
base model's eval; the 1-worker run, whose start-up is ``first_step_s_warm``, reads it from the cache as a user's
second run does (the bench fails if it did not). The worker loop writes wall-clock marks into each epoch
checkpoint's ``train_state.pt`` (``timing``: epoch start, first optimizer step), so the milestones are read, not
derived. Two earlier milestones come from the run's own log lines: Ray connected (Ray's timestamp, ms) and
TorchTrainer launched (sftray's "training ... on N worker(s)" line, 1 s resolution).

Throughput: ``sftray train`` runs ``EPOCHS`` epochs, 1 worker x 1 CPU, 2 workers x 1 CPU with the layout
``train.parallelism=auto`` picks (DDP for this model) and 2 FSDP2 workers x 1 CPU; its figure is
``train/target_tokens_per_s`` (trained tokens from an epoch's first micro-batch to its last step), median over the
epochs after the first (the first warms thread pools and the allocator). The references train the same model on
the same prepared rows, in this process, for ``EPOCHS`` epochs with the same median:

- the loop's own pieces (``grouped_micro_batches``, ``collate_rows``, ``build_optimizer``, ``optimizer_step``)
  with 1 thread, and with 2 threads at the 2-worker runs' global batch (grad_accum 2), without Ray;
  ``train_ray_over_in_process`` is the lower of the 1-worker and the default 2-worker ratios (FSDP2's apart);
- TRL's best configuration of the throughput part (``trl_best_config``; without that part, BFD at batch 1 x
  gradient accumulation) on the examples of those rows (each packed row split where its position ids restart),
  1 thread, the same number of optimizer steps per epoch: ``train_ray_over_best_trl`` is the 1-worker Ray run over
  it, both measured here on the same examples.
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
from sftray.layout import EPOCH_GLOB, runs_dir

SECTION = "overhead"
TRAIN_ROW = "sftray train: process start -> first optimizer step"
TRAIN_CONNECTED_ROW = "sftray train: process start -> Ray connected (imports, config, ray.init)"
TRAIN_LAUNCH_ROW = "sftray train: process start -> TorchTrainer launched (cached data checked, datasets built)"
TRAIN_LOOP_ROW = "sftray train: process start -> training loop start (workers up, model loaded, base eval read)"
TRAIN_WALL_ROW = "sftray train: whole process (3 epochs, evals, checkpoints, exit)"
RAY_TPS_1 = "Ray Train path, 1 worker x 1 CPU (DDP): target tokens/s"
IN_PROCESS_TPS_1 = "in-process step code, 1 thread, same rows: target tokens/s"
RAY_TPS_2 = "Ray Train path, 2 workers x 1 CPU (parallelism=auto: DDP): target tokens/s"
RAY_TPS_FSDP = "Ray Train path, 2 workers x 1 CPU (FSDP2): target tokens/s"
IN_PROCESS_TPS_2 = "in-process step code, 2 threads, same rows and global batch: target tokens/s"
TRL_TPS_1 = "TRL's best configuration, 1 thread, the same examples: target tokens/s"
RAY_INIT_ROW = "ray.init(): cold local Ray start"
EPOCHS = 3
DEFAULT_TRL = "TRL BFD, batch 1 x grad accum"
"""TRL's configuration when the throughput part did not run (its best on this bench so far)."""
SUMMARY_KEYS = (
    "first_step_s_warm",
    "train_ray_over_in_process",
    "train_ray_fsdp_over_in_process",
    "train_ray_over_best_trl",
)
"""This part's keys of the bench's top-level summary."""


def overrides(
    *,
    cache_dir: Path,
    out_dir: Path,
    chats: Path,
    model_dir: Path,
    max_seq_len: int,
    workers: int = 1,
    parallelism: str = "auto",
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
        f"train.parallelism={parallelism}",
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
    ray_init_seconds: float | None,
    trl_config: str | None = None,
) -> tuple[list[dict], dict[str, float]]:
    """Rows and this part's summary figures; Ray must be initialised (the runs join it). ``trl_config``: TRL's
    best configuration of the throughput part (None: ``DEFAULT_TRL``)."""
    from sftray.config import compose_config
    from sftray.recipes.prep import prep

    work_dir = Path(work_dir)
    shutil.rmtree(runs_dir(work_dir / "out"), ignore_errors=True)  # every run read below must be this one's
    work_dir.mkdir(parents=True, exist_ok=True)
    chats = work_dir / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in demo_conversations(n=conversations)))

    def args(workers: int, parallelism: str = "auto") -> list[str]:
        return overrides(
            cache_dir=cache_dir,
            out_dir=work_dir / "out",
            chats=chats,
            model_dir=model_dir,
            max_seq_len=max_seq_len,
            workers=workers,
            parallelism=parallelism,
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

    # The first run computes the base model's eval, which every later run with the same base, data and eval config
    # reads from the cache (its key does not depend on the worker count or layout), so the 1-worker run's start-up
    # is a user's second run: Ray up, data prepared, base eval cached.
    fsdp = _sftray_train(args(2, "fsdp"), work_dir=work_dir, label="2x1-fsdp")
    two = _sftray_train(args(2), work_dir=work_dir, label="2x1")
    one = _sftray_train(args(1), work_dir=work_dir, label="1x1")
    if not one["base_reused"]:
        raise RuntimeError("the 1-worker run computed the base model's eval: its start-up would not be a warm one")
    local_one = _in_process(prepared, cfg=cfg, model_dir=model_dir, threads=1, grad_accum=1)
    local_two = _in_process(prepared, cfg=cfg, model_dir=model_dir, threads=2, grad_accum=2)
    trl_name = trl_config or DEFAULT_TRL
    trl_one = _trl(
        prepared,
        model_dir=model_dir,
        name=trl_name,
        steps=one["steps_per_epoch"],
        max_seq_len=max_seq_len,
        work_dir=work_dir,
    )
    rows += [
        _row(TRAIN_CONNECTED_ROW, _since(one["marks"].get("connected"), one["started"]), note="Ray's log line (ms)"),
        _row(TRAIN_LAUNCH_ROW, _since(one["marks"].get("launch"), one["started"]), note="sftray's log line (+-1 s)"),
        _row(TRAIN_LOOP_ROW, one["loop_start"] - one["started"]),
        _row(TRAIN_ROW, one["first_step"] - one["started"]),
        _row(TRAIN_WALL_ROW, one["ended"] - one["started"]),
    ]
    median_note = f"median of epochs 2-{EPOCHS}"
    rows += [
        _tps(RAY_TPS_1, one["tps"], note=median_note),
        _tps(IN_PROCESS_TPS_1, local_one, note=median_note),
        _tps(TRL_TPS_1, trl_one, note=f"{trl_name}, {median_note}"),
        _tps(RAY_TPS_2, two["tps"], note=median_note),
        _tps(RAY_TPS_FSDP, fsdp["tps"], note=median_note),
        _tps(IN_PROCESS_TPS_2, local_two, note=median_note),
    ]
    m = statistics.median
    summary = {
        "first_step_s_warm": one["first_step"] - one["started"],
        "train_ray_over_in_process": min(m(one["tps"]) / m(local_one), m(two["tps"]) / m(local_two)),
        "train_ray_fsdp_over_in_process": m(fsdp["tps"]) / m(local_two),
        "train_ray_over_best_trl": m(one["tps"]) / m(trl_one),
    }
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
        "steps_per_epoch": int(epochs[1]["step"]),
        "first_step": epochs[1]["timing"]["first_step_at"],
        "tps": [
            _epoch_metrics(state, epoch)[TRAIN_TARGET_TOKENS_PER_S] for epoch, state in epochs.items() if epoch > 1
        ],
    }


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


def _trl(prepared: Any, *, model_dir: Path, name: str, steps: int, max_seq_len: int, work_dir: Path) -> list[float]:
    """Target tokens/s of epochs 2..EPOCHS of TRL configuration ``name`` on the examples of the prepared training
    rows (split at each row's ``seq_lens``), ``steps`` optimizer steps per epoch, 1 thread, in this process."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from sftray.bench.throughput import trl_epoch_rates

    table = pa.concat_tables([pq.read_table(f) for f in sorted(prepared.train_dir.glob("*.parquet"))])
    examples = []
    for row in table.select(["input_ids", "labels", "seq_lens"]).to_pylist():
        start = 0
        for n in row["seq_lens"]:
            examples.append(
                {"input_ids": row["input_ids"][start : start + n], "labels": row["labels"][start : start + n]}
            )
            start += n
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = trl_epoch_rates(
            examples,
            name=name,
            model_dir=model_dir,
            steps=steps,
            max_seq_len=max_seq_len,
            epochs=EPOCHS,
            out_dir=work_dir / "trl",
        )
    finally:
        torch.set_num_threads(saved_threads)
    return rates[1:]


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


def _tps(name: str, rates: list[float], *, note: str) -> dict[str, Any]:
    return {
        "section": SECTION,
        "name": name,
        "value": statistics.median(rates),
        "values": rates,
        "unit": "tokens/s",
        "note": note,
    }
