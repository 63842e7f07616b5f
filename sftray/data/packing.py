"""Packing and padding of tokenized examples into training rows (pure functions, no Ray, no torch).

A packed row concatenates whole examples. Each example restarts its ``position_ids`` at 0: transformers 5 turns
position_ids that restart into a block-diagonal attention mask (sdpa/eager, when ``attention_mask is None`` and
``use_cache=False``) or into varlen sequence boundaries (flash-attention), so no token attends across examples.
``tests/data/test_packing_logits.py`` proves it: a packed row's logits equal each example's logits run alone.

Rows are stored unpadded (length <= max_seq_len); ``sftray.data.collate`` pads a batch at load time.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from typing import Any

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
