"""Collation of stored rows into model-ready torch batches (packed or padded).

Packed batches carry no ``attention_mask``: transformers then derives per-example attention from the
``position_ids`` that restart at 0 for every example. The padded tail of a packed row gets its own restarting
positions, so it forms one more (fully masked-out, label -100) sequence and touches nothing real.
Padded batches carry an ``attention_mask``; pad positions are labelled -100 by position, never by token id, so
``pad_token == eos_token`` cannot hide a trained eos.

Micro-batches are padded to their longest row, and ``length_grouped`` puts rows of similar length into the same
micro-batch, so little compute goes to padding: the partly filled rows packing leaves, or the short examples of
padding mode, share a micro-batch with each other rather than with full rows.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from sftray.data.chat import IGNORE_INDEX

LENGTH_GROUP = 8
"""Micro-batches drawn together, sorted by row length and split (``length_grouped``): more groups tighter
(less padding), fewer keep the order closer to the shuffle."""


def length_grouped(batch: Mapping[str, Sequence[Any]], *, size: int, rng: random.Random) -> Iterator[dict[str, list]]:
    """Splits a column batch into micro-batches of ``size`` rows (the last may be smaller) of similar length.

    Rows are sorted by length (stable, so the result is deterministic), cut into micro-batches, and the
    micro-batches come out in ``rng``'s shuffled order, so long and short micro-batches alternate at random.
    Every row appears exactly once; ``ceil(rows / size)`` micro-batches, as plain batching would give.
    """
    n = len(batch["input_ids"])
    order = sorted(range(n), key=lambda i: len(batch["input_ids"][i]))
    groups = [order[i : i + size] for i in range(0, n, size)]
    rng.shuffle(groups)
    for group in groups:
        yield {k: [col[i] for i in group] for k, col in batch.items()}


def epoch_rows(num_rows: int, *, rank: int, world: int, seed: int) -> list[int]:
    """Row indices rank ``rank`` trains on in one epoch: a permutation of all rows drawn from ``seed`` (the same on
    every rank), dealt out round-robin, as torch's DistributedSampler does. Every epoch (seed) reshuffles the whole
    set, and ranks never share a row; ``num_rows`` must be a multiple of ``world`` (the driver pads it)."""
    if num_rows % world:
        raise ValueError(f"{num_rows} rows do not split evenly over {world} ranks")
    order = list(range(num_rows))
    random.Random(seed).shuffle(order)
    return order[rank::world]


def grouped_micro_batches(
    windows: Iterable[Mapping[str, Sequence[Any]]], *, size: int, seed: int, collate: Callable[[dict], Any]
) -> Iterator[Any]:
    """``collate``d micro-batches of ``size`` rows from column batches of ``LENGTH_GROUP x size`` shuffled rows,
    each window split by ``length_grouped`` (``seed`` fixes the order of its micro-batches)."""
    rng = random.Random(seed)
    for window in windows:
        for group in length_grouped(window, size=size, rng=rng):
            yield collate(group)


def collate_rows(
    batch: Mapping[str, Sequence[Any]], *, pad_id: int, packed: bool, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Column batch (as Ray Data yields it) -> ``input_ids``, ``labels``, ``position_ids`` [, ``attention_mask``].

    ``pad_to`` fixes the sequence length (for callers that need one fixed shape); default is the longest row.
    Also returns ``token_kind`` (0 pad, 1 chat, 2 pretraining) for per-source losses.
    """
    rows = [list(map(int, ids)) for ids in batch["input_ids"]]
    width = max(len(r) for r in rows) if pad_to is None else pad_to
    if any(len(r) > width for r in rows):
        raise ValueError(f"a row has {max(map(len, rows))} tokens, more than pad_to={width}")
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    token_kind = torch.zeros((n, width), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, ids in enumerate(rows):
        k = len(ids)
        input_ids[i, :k] = torch.tensor(ids)
        labels[i, :k] = torch.as_tensor(list(map(int, batch["labels"][i])))
        position_ids[i, :k] = torch.as_tensor(list(map(int, batch["position_ids"][i])))
        position_ids[i, k:] = torch.arange(width - k)
        attention_mask[i, :k] = 1
        start = 0
        for length, kind in zip(batch["seq_lens"][i], batch["seq_kinds"][i]):
            token_kind[i, start : start + int(length)] = int(kind)
            start += int(length)
    out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "token_kind": token_kind}
    if not packed:
        out["attention_mask"] = attention_mask
    return out


def micro_batches(
    rows: Any, *, rank: int, world: int, size: int, collate: Callable[[dict], Any], seed: int
) -> Iterator[Any]:
    """The micro-batches rank ``rank`` trains on in one epoch (``rows``: an Arrow table of all training rows): its
    share of a fresh permutation of every row (``epoch_rows``), in windows of ``LENGTH_GROUP`` micro-batches whose
    rows of similar length go together (``length_grouped``). The worker loop and the bench's in-process run both
    call it, so the bench times the epoch that trains."""
    mine = epoch_rows(rows.num_rows, rank=rank, world=world, seed=seed)
    step = LENGTH_GROUP * size
    windows = (rows.take(mine[i : i + step]).to_pydict() for i in range(0, len(mine), step))
    return grouped_micro_batches(windows, size=size, seed=seed, collate=collate)
