"""The LM head at target positions only: CPU seconds per training step with the head at every position and with
the head at target positions, on the same packed rows, side by side in one process.

Two copies of the bench model (same seed, full fine-tuning, float32) train on the throughput part's examples,
packed and batched as ``sftray.train.loop`` does, with ``sftray.train.step.optimizer_step``: one with
``full_head=True`` (every position, as evaluation computes it), one with the default (target positions only). After
a warm-up step of each, every timed step runs the same micro-batch on both, alternating which goes first, for
``repeats`` passes over the epoch. A step's cost is this process's CPU time (``time.process_time``: every torch
thread, none of another process's work); each configuration's figure is the median over its timed steps, and
``lm_head_targets_speedup`` is the full head's median over the target head's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sftray.bench.workload import SEED

SECTION = "lm_head"
FULL_ROW = "training step, LM head at every position"
TARGETS_ROW = "training step, LM head at target positions only (the default)"
SUMMARY_KEYS = ("lm_head_targets_speedup",)


def measure_lm_head(
    examples: Sequence[dict],
    *,
    model_dir: Path,
    max_seq_len: int,
    steps: int,
    threads: int,
    repeats: int,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Rows (per-step CPU seconds of each head) and the summary's ``lm_head_targets_speedup``."""
    import torch
    from transformers import AutoTokenizer

    from sftray.bench.packing import sftray_micro_batches
    from sftray.bench.throughput import LR, MAX_GRAD_NORM
    from sftray.config import TrainConfig
    from sftray.core.loss import count_targets
    from sftray.data.packing import pack_examples
    from sftray.models.loading import load_model
    from sftray.train.step import build_optimizer, optimizer_step

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        rows = pack_examples(examples, max_seq_len=max_seq_len, seed=SEED)
        per_step = -(-len(rows) // steps)  # ceil: every configuration of the throughput part takes `steps` steps
        batches = list(sftray_micro_batches(rows, size=per_step, pad_id=tokenizer.pad_token_id, packed=True))
        cfg = TrainConfig(method="full", parallelism="ddp", lr=LR, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM)
        trainers = {}
        for full_head in (True, False):
            torch.manual_seed(SEED)
            model, _ = load_model(str(model_dir), tokenizer=tokenizer)
            model.train()
            trainers[full_head] = (model, build_optimizer(model.parameters(), cfg=cfg))
        cpu = torch.device("cpu")

        def step(full_head: bool, batch: dict) -> float:
            model, optimizer = trainers[full_head]
            started = time.process_time()
            optimizer_step(model, optimizer, [batch], cfg=cfg, device=cpu, world=1, bf16=False, full_head=full_head)
            return time.process_time() - started

        for full_head in trainers:  # warm-up: thread pools, allocator, AdamW state
            step(full_head, batches[0])
        seconds: dict[bool, list[float]] = {True: [], False: []}
        for repeat in range(repeats):
            for i, batch in enumerate(batches):
                order = (True, False) if (repeat + i) % 2 == 0 else (False, True)
                for full_head in order:
                    seconds[full_head].append(step(full_head, batch))
    finally:
        torch.set_num_threads(saved_threads)
    targets = sum(count_targets(b["labels"]) for b in batches)
    positions = sum(b["input_ids"].numel() for b in batches)
    common = {
        "section": SECTION,
        "threads": threads,
        "max_seq_len": max_seq_len,
        "rows_per_step": per_step,
        "steps": len(batches),
        "repeats": repeats,
        "target_share": targets / positions,
        "unit": "CPU s/step",
    }
    out = [
        {**common, "name": name, "values": seconds[full_head], "median": statistics.median(seconds[full_head])}
        for name, full_head in ((FULL_ROW, True), (TARGETS_ROW, False))
    ]
    return out, {"lm_head_targets_speedup": out[0]["median"] / out[1]["median"]}
