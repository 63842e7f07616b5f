"""The split plan's driver decisions and the tagging transform that applies them (pure, no Ray): which rows each
split takes, the mix's cut of a window, extra copies under their own keys, and the rows no split takes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from sftray.config import MixConfig
from sftray.data.packing import KIND_PRETRAIN, KIND_SFT
from sftray.data.split_plan import cut_lists, plan_mix, plan_splits, tag_splits


def test_cut_lists_keeps_each_lists_prefix():
    column = pa.chunked_array([pa.array([[1, 2, 3], [], [4, 5]], type=pa.list_(pa.int32()))])
    assert cut_lists(column, np.asarray([2, 0, 2])).to_pylist() == [[1, 2], [], [4, 5]]
    assert cut_lists(column.chunk(0).slice(1), np.asarray([0, 1])).to_pylist() == [[], [4]]


def _meta(rows: list[tuple[int, str, str, int, int]]) -> pd.DataFrame:
    """(key, split, reason, n_tokens, copies) per conversation."""
    return pd.DataFrame(rows, columns=["key", "split", "reason", "n_tokens", "copies"]).astype({"key": "uint64"})


def test_the_plan_takes_copies_and_windows_and_tagging_applies_it():
    meta = _meta(
        [(10, "train", "", 3, 2), (20, "train", "duplicate", 3, 1), (30, "val", "", 2, 1), (40, "train", "", 3, 0)]
    )
    windows = pd.DataFrame({"key": [100, 200], "n_tokens": [4, 4], "heldout": [False, True]}).astype({"key": "uint64"})
    ok = meta["reason"] == ""
    train_meta, val_meta = (
        meta[ok & (meta["split"] == "train") & (meta["copies"] > 0)],
        meta[ok & (meta["split"] == "val")],
    )
    # 6 SFT tokens (key 10 twice) at ratio 0.25: 2 pretraining tokens, cut from the one pool window.
    mix = plan_mix(train_meta, windows, mix=MixConfig(ratio=0.25), seed=0)
    assert (mix.target, mix.takes, mix.heldout_keys) == (2, {100: 2}, [200])
    plan, keys = plan_splits(meta, train_meta, val_meta, mix=mix, group_size=100, seed=0)
    assert len(keys["train"]) == 3 and 10 in keys["train"] and 100 in keys["train"]  # key 10, its copy, the window
    assert keys["val"] == [30] and keys["pretrain_heldout"] == [200]

    batch = pa.table(
        {
            "input_ids": pa.array(
                [[1, 2, 3], [1, 2, 3], [5, 6], [7, 8, 9], [9, 9, 9, 9], [8, 8, 8, 8]], pa.list_(pa.int32())
            ),
            "labels": pa.array(
                [[1, 2, 3], [1, 2, 3], [5, 6], [7, 8, 9], [9, 9, 9, 9], [8, 8, 8, 8]], pa.list_(pa.int32())
            ),
            "kind": pa.array([KIND_SFT] * 4 + [KIND_PRETRAIN] * 2, pa.int8()),
            "key": pa.array([10, 20, 30, 40, 100, 200], pa.uint64()),
            "reason": ["", "duplicate", "", "", "", ""],
            "split": ["train", "train", "val", "train", "pretrain", "pretrain"],
        }
    )
    tagged = tag_splits(batch, plan=plan).to_pydict()
    assert tagged["split"] == ["train", "", "val", "", "train", "pretrain_heldout", "train"]
    assert tagged["input_ids"] == [[1, 2, 3], [], [5, 6], [], [9, 9], [8, 8, 8, 8], [1, 2, 3]]
    assert tagged["key"][-1] not in (10, 20, 30, 40, 100, 200)  # the weight's extra copy has its own key
