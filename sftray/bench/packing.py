"""Packing efficiency: the share of non-pad tokens in what the model computes on, sftray versus TRL (limit 100%).

Every method sees the same examples in the same (seeded) order, after dropping those longer than max_seq_len.
Two figures per method:

- ``fill``: tokens / (rows x max_seq_len), how full the rows are (packing quality; one example per row when not
  packing);
- ``efficiency``: non-pad tokens / tensor slots of the batches each trainer really builds, measured on the real
  collators (sftray's ``grouped_micro_batches`` + ``collate_rows`` as ``sftray.train.loop`` calls them; TRL's
  ``DataCollatorForLanguageModeling``), batch sizes at each library's default.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

from sftray.bench.workload import SEED, fitting, shuffled, trl_dataset
from sftray.config import DataConfig, TrainConfig
from sftray.data.chat import IGNORE_INDEX
from sftray.data.collate import LENGTH_GROUP, collate_rows, grouped_micro_batches
from sftray.data.packing import pack_examples, pad_examples

SECTION = "packing"
METHODS = (
    "sftray packed (BFD, length-grouped micro-batches)",
    "sftray padded (one example per row, length-grouped micro-batches)",
    "TRL packing (BFD, padding-free batches)",
    "TRL default (padded to longest in batch)",
    "TRL padding_free (flattened batches)",
)
"""Row names, in table order."""

PACK_GROUP_SIZE = next(f.default for f in dataclasses.fields(DataConfig) if f.name == "pack_group_size")
"""Examples sftray packs together (its default ``data.pack_group_size``)."""
MICRO_BATCH_SIZE = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "micro_batch_size")
"""sftray rows per forward pass (its default ``train.micro_batch_size``)."""


def measure_packing(*, datasets: dict[str, Sequence[dict]], seq_lens: Sequence[int], pad_id: int) -> list[dict]:
    """One row per (dataset, max_seq_len, method) with fill, efficiency and token counts; asserts that every method
    keeps every token and every target."""
    rows = []
    for dataset, examples in datasets.items():
        for max_seq_len in seq_lens:
            kept = shuffled(fitting(examples, max_seq_len=max_seq_len))
            common = {
                "section": SECTION,
                "dataset": dataset,
                "max_seq_len": max_seq_len,
                "examples": len(kept),
                "dropped_too_long": len(examples) - len(kept),
            }
            tokens = sum(len(ex["input_ids"]) for ex in kept)
            targets = sum(_targets(ex["labels"]) for ex in kept)
            for name, measured in zip(METHODS, _methods(kept, max_seq_len=max_seq_len, pad_id=pad_id)):
                assert measured["tokens"] == tokens, (name, dataset, max_seq_len, "lost tokens")
                assert measured["trained_tokens"] == targets, (name, dataset, max_seq_len, "lost targets")
                rows.append({**common, "name": name, **measured})
    return rows


def _methods(examples: list[dict], *, max_seq_len: int, pad_id: int) -> Iterator[dict[str, Any]]:
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling, SFTConfig

    trl_batch = next(f.default for f in dataclasses.fields(SFTConfig) if f.name == "per_device_train_batch_size")

    # sftray packing as the pipeline does it: groups of pack_group_size examples, each packed best-fit-decreasing.
    started = time.perf_counter()
    packed = [
        row
        for i in range(0, len(examples), PACK_GROUP_SIZE)
        for row in pack_examples(examples[i : i + PACK_GROUP_SIZE], max_seq_len=max_seq_len, seed=SEED + i)
    ]
    seconds = time.perf_counter() - started
    yield _sftray(packed, max_seq_len=max_seq_len, pad_id=pad_id, packed=True, seconds=seconds)
    yield _sftray(pad_examples(examples), max_seq_len=max_seq_len, pad_id=pad_id, packed=False, seconds=0.0)

    # TRL packs with Dataset.map(batched=True): groups of 1000 examples (the map default SFTTrainer keeps).
    table = trl_dataset(examples)
    started = time.perf_counter()
    trl_packed = pack_dataset(table, max_seq_len, strategy="bfd", map_kwargs={"keep_in_memory": True})
    trl_rows = trl_packed.to_list()
    seconds = time.perf_counter() - started
    padding_free = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)
    padded = DataCollatorForLanguageModeling(pad_token_id=pad_id)
    yield _trl(trl_rows, max_seq_len=max_seq_len, collator=padding_free, batch_size=trl_batch, seconds=seconds)
    plain = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in examples]
    yield _trl(plain, max_seq_len=max_seq_len, collator=padded, batch_size=trl_batch, seconds=0.0)
    yield _trl(plain, max_seq_len=max_seq_len, collator=padding_free, batch_size=trl_batch, seconds=0.0)


def _sftray(rows: list[dict], *, max_seq_len: int, pad_id: int, packed: bool, seconds: float) -> dict[str, Any]:
    tokens = slots = targets = 0
    for batch in sftray_micro_batches(rows, size=MICRO_BATCH_SIZE, pad_id=pad_id, packed=packed):
        slots += batch["input_ids"].numel()
        tokens += int((batch["token_kind"] > 0).sum())  # pad positions are kind 0
        targets += int((batch["labels"] != IGNORE_INDEX).sum())
    return _figures(rows=len(rows), tokens=tokens, targets=targets, slots=slots, max_seq_len=max_seq_len, s=seconds)


def sftray_micro_batches(rows: Sequence[dict], *, size: int, pad_id: int, packed: bool) -> Iterator[dict]:
    """The micro-batches ``sftray.train.loop`` builds from rows in this (already shuffled) order: windows of
    ``LENGTH_GROUP x size`` rows, split by length, each padded to its longest row."""
    window = LENGTH_GROUP * size
    windows = ({k: [r[k] for r in rows[i : i + window]] for k in rows[0]} for i in range(0, len(rows), window))
    collate = partial(collate_rows, pad_id=pad_id, packed=packed)
    return grouped_micro_batches(windows, size=size, seed=SEED, collate=collate)


def _trl(rows: list[dict], *, max_seq_len: int, collator: Any, batch_size: int, seconds: float) -> dict[str, Any]:
    tokens = slots = targets = 0
    for i in range(0, len(rows), batch_size):
        batch = collator(rows[i : i + batch_size])
        slots += batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()  # padding-free: no pad at all
        targets += int((batch["labels"] != IGNORE_INDEX).sum())
    return _figures(rows=len(rows), tokens=tokens, targets=targets, slots=slots, max_seq_len=max_seq_len, s=seconds)


def _figures(*, rows: int, tokens: int, targets: int, slots: int, max_seq_len: int, s: float) -> dict[str, Any]:
    return {
        "rows": rows,
        "tokens": tokens,
        "trained_tokens": targets,
        "slots": slots,
        "fill": tokens / (rows * max_seq_len),
        "efficiency": tokens / slots,
        "pack_seconds": s,
    }


def _targets(labels: Sequence[int]) -> int:
    return sum(1 for x in labels if x != IGNORE_INDEX)
