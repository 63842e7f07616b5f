"""Packing and padding of tokenized examples into training rows (pure functions, no Ray, no torch).

A packed row concatenates whole examples. Each example restarts its ``position_ids`` at 0: transformers 5 turns
position_ids that restart into a block-diagonal attention mask (sdpa/eager, when ``attention_mask is None`` and
``use_cache=False``) or into varlen sequence boundaries (flash-attention), so no token attends across examples.
``tests/data/test_packing_logits.py`` proves it: a packed row's logits equal each example's logits run alone.

Rows are stored unpadded (length <= max_seq_len); ``sftray.data.collate`` pads a batch at load time.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from sftray.data.chat import IGNORE_INDEX

KIND_SFT = 1
"""``seq_kinds`` code of a chat example (loss on assistant turns only)."""
KIND_PRETRAIN = 2
"""``seq_kinds`` code of a pretraining window (loss on every token)."""


def pack_bfd(lengths: Sequence[int], *, capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: lists of indices into ``lengths`` whose sums stay <= ``capacity``.

    Items are placed longest first, each into the fullest bin that still has room (O(n log n) search; bins kept
    sorted by free space). Ties break by index, so the result is deterministic.
    """
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(f"item {i} has length {n}; packing needs 0 < length <= capacity={capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), ascending
    for i in order:
        n = lengths[i]
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            room, b = free.pop(pos)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def pack_examples(examples: Sequence[dict[str, Any]], *, max_seq_len: int, seed: int | None = None) -> list[dict]:
    """Packs examples (``input_ids``, ``labels``, optional ``kind``) into rows of at most ``max_seq_len`` tokens.

    Each row holds ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 per example), ``seq_lens`` and
    ``seq_kinds``. With ``seed`` the row order is shuffled (BFD emits rows longest-first); without it, BFD order.
    """
    bins = pack_bfd([len(ex["input_ids"]) for ex in examples], capacity=max_seq_len)
    rows = [_concat([examples[i] for i in b]) for b in bins]
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows


def pad_examples(examples: Sequence[dict[str, Any]]) -> list[dict]:
    """One example per row (padding mode): same row schema as ``pack_examples``; collate pads and masks."""
    return [_concat([ex]) for ex in examples]


def _concat(examples: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": [], "seq_kinds": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n:
            raise ValueError(f"example has {n} input_ids but {len(ex['labels'])} labels")
        row["input_ids"].extend(ex["input_ids"])
        # An example's first token is never a target (nothing precedes it); in a packed row the causal shift
        # would make the previous example's last token predict it, so its label is masked.
        row["labels"].append(IGNORE_INDEX)
        row["labels"].extend(ex["labels"][1:])
        row["position_ids"].extend(range(n))
        row["seq_lens"].append(n)
        row["seq_kinds"].append(int(ex.get("kind", KIND_SFT)))
    return row


def pack_table(examples: pa.Table, *, max_seq_len: int, packing: bool, seed: int | None = None) -> pa.Table:
    """The rows ``pack_examples`` (``packing``) or ``pad_examples`` make from the same examples, in the same order,
    as Arrow columns of ``sftray.data.schema.ROW_SCHEMA``, plus ``num_tokens``, ``num_trained`` and
    ``num_pretrain_tokens`` per row.

    ``examples`` has ``input_ids`` and ``labels`` (int lists) and ``kind``. Only the bin packing loops in Python
    (over lengths); tokens move as numpy gathers, which keeps the pipeline's pack step a small share of a prep.
    """
    ids, labels = int32_lists(examples["input_ids"]), int32_lists(examples["labels"])
    offsets = ids.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    if not np.array_equal(np.diff(labels.offsets.to_numpy().astype(np.int64)), lengths):
        bad = int(np.flatnonzero(np.diff(labels.offsets.to_numpy()) != lengths)[0])
        raise ValueError(f"example {bad} has {lengths[bad]} input_ids but a different number of labels")
    if len(lengths) and lengths.min() <= 0:
        raise ValueError(f"example {int(np.argmin(lengths))} has no tokens")
    if packing:
        bins = pack_bfd(lengths.tolist(), capacity=max_seq_len)
        if seed is not None:
            random.Random(seed).shuffle(bins)  # the same permutation pack_examples applies to its rows
    else:
        bins = [[i] for i in range(len(lengths))]
    order = np.fromiter(itertools.chain.from_iterable(bins), dtype=np.int64, count=len(lengths))
    ex_len = lengths[order]
    ex_start = np.concatenate([[0], np.cumsum(ex_len)])  # each example's first token in the output
    total = int(ex_start[-1])
    within = np.arange(total, dtype=np.int64) - np.repeat(ex_start[:-1], ex_len)  # = position_ids
    gather = np.repeat(offsets[:-1][order], ex_len) + within
    flat_ids = ids.values.to_numpy()[gather]
    flat_labels = labels.values.to_numpy()[gather].copy()
    # An example's first token is never a target (see _concat): in a packed row, the previous example would
    # predict it.
    flat_labels[ex_start[:-1]] = IGNORE_INDEX
    row_ex = np.concatenate([[0], np.cumsum([len(b) for b in bins])]).astype(np.int64)
    row_tok = ex_start[row_ex]
    kinds = np.asarray(examples["kind"].to_numpy(), dtype=np.int8)[order] if len(order) else np.zeros(0, np.int8)
    trained = np.concatenate([[0], np.cumsum(flat_labels != IGNORE_INDEX)])[row_tok]
    pretrain = np.concatenate([[0], np.cumsum(np.where(kinds == KIND_PRETRAIN, ex_len, 0))])[row_ex]

    def lists(offs: np.ndarray, values: np.ndarray, kind: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(offs, type=pa.int32()), pa.array(values, type=kind))

    return pa.table(
        {
            "input_ids": lists(row_tok, flat_ids, pa.int32()),
            "labels": lists(row_tok, flat_labels, pa.int32()),
            "position_ids": lists(row_tok, within, pa.int32()),
            "seq_lens": lists(row_ex, ex_len, pa.int32()),
            "seq_kinds": lists(row_ex, kinds, pa.int8()),
            "num_tokens": pa.array(np.diff(row_tok), type=pa.int32()),
            "num_trained": pa.array(np.diff(trained), type=pa.int32()),
            "num_pretrain_tokens": pa.array(np.diff(pretrain), type=pa.int32()),
        }
    )


def int32_lists(column: Any) -> pa.ListArray:
    """An Arrow list column (chunked or not) as one ``list<int32>`` array."""
    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    # A slice's offsets stay absolute into ``.values`` (the whole child array), which is how pack_table gathers.
    return lists.cast(pa.list_(pa.int32()))
