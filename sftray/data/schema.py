"""Arrow schemas of the pipeline's tables: encoded examples and their metadata, stored training rows."""

from __future__ import annotations

import pyarrow as pa

from sftray.data.chat import IGNORE_INDEX

EXAMPLE_COLUMNS = ["input_ids", "labels", "kind", "key"]
"""Columns of an encoded example that packing needs."""
ROW_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),
        ("seq_lens", pa.list_(pa.int32())),
        ("seq_kinds", pa.list_(pa.int8())),
        ("num_tokens", pa.int32()),
        ("num_trained", pa.int32()),
        ("num_pretrain_tokens", pa.int32()),
    ]
)
"""Schema of a stored training row (train, val and pretrain_heldout alike)."""
META_COLUMNS = ["where", "source", "split", "reason", "error", "truncated", "n_tokens", "n_trained", "key", "heldout"]
"""Columns of an encoded example the driver reads back (drop accounting, splits, the mix): no tokens travel."""


def empty_rows(n: int, *, pad_id: int) -> pa.Table:
    """``n`` stored rows of one pad token and no target: they even out the ranks' shares and train nothing."""
    row = {
        "input_ids": [pad_id],
        "labels": [IGNORE_INDEX],
        "position_ids": [0],
        "seq_lens": [1],
        "seq_kinds": [0],
        "num_tokens": 0,
        "num_trained": 0,
        "num_pretrain_tokens": 0,
    }
    return pa.Table.from_pylist([row] * n, schema=ROW_SCHEMA)
