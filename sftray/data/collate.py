"""Collation of stored rows into model-ready torch batches (packed or padded).

Packed batches carry no ``attention_mask``: transformers then derives per-example attention from the
``position_ids`` that restart at 0 for every example. The padded tail of a packed row gets its own restarting
positions, so it forms one more (fully masked-out, label -100) sequence and touches nothing real.
Padded batches carry an ``attention_mask``; pad positions are labelled -100 by position, never by token id, so
``pad_token == eos_token`` cannot hide a trained eos.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sftray.data.chat import IGNORE_INDEX


def collate_rows(
    batch: Mapping[str, Sequence[Any]], *, pad_id: int, packed: bool, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Column batch (as Ray Data yields it) -> ``input_ids``, ``labels``, ``position_ids`` [, ``attention_mask``].

    ``pad_to`` fixes the sequence length (a fixed shape keeps compiled kernels and FSDP buckets stable); default
    is the longest row. Also returns ``token_kind`` (0 pad, 1 chat, 2 pretraining) for per-source losses.
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
