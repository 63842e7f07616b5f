"""Split and pack planning: which examples each output split takes, in which pack group, and the transforms that
apply the plan to the encoded set.

The driver decides from keys and lengths alone (no tokens travel): the pretraining windows the mix takes and their
cut, extra copies (a source weight's, a later pass over the corpus), the held-out windows, and each split's pack
groups as key ranges. Every tagging task gets the same ``SplitPlan``, so the output does not depend on Ray's block
layout: each (split, group) is packed on its own, its examples sorted by key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sftray.config import MixConfig
from sftray.data.mixing import pretrain_token_target, repeat_windows, stable_key
from sftray.data.packing import int32_lists, pack_table
from sftray.data.schema import ROW_SCHEMA

WHOLE = np.iinfo(np.int64).max
"""A copy's length when it takes the whole example."""


@dataclass(frozen=True, kw_only=True)
class MixPlan:
    """The pretraining windows mixed into train: an exact token ratio of the SFT tokens, in whole passes."""

    target: int
    """Pretraining tokens the mix wants (``pretrain_token_target``)."""
    passes: list[list[tuple[int, int]]]
    """Per pass over the corpus: (window index into the pool, tokens taken) of each window it takes."""
    takes: dict[int, int]
    """First pass: window key -> tokens taken."""
    repeats: list[tuple[int, int, int]]
    """Later passes: (window key, the copy's own key, tokens taken)."""
    heldout_keys: list[int]
    """Sorted keys of the held-out windows (the forgetting measure), at most mix.max_heldout_windows."""


@dataclass(frozen=True, kw_only=True)
class SplitPlan:
    """The driver's decisions, shipped to every tagging task: which examples each split takes, and its groups."""

    bounds: dict[str, np.ndarray]
    """Per split: the first key of each pack group but the first (``searchsorted`` gives the group)."""
    take_keys: np.ndarray
    """Sorted keys of the pretraining windows mixed into train..."""
    take_lens: np.ndarray
    """...and how many of each window's tokens it takes (the last one is cut to the exact remainder)."""
    heldout_keys: np.ndarray
    """Sorted keys of the held-out pretraining windows (the forgetting measure)."""
    unused_keys: np.ndarray
    """Sorted keys of conversations no split takes: curation drops (duplicates) and a weight's unused examples."""
    copy_of: np.ndarray
    """Sorted keys of the examples that go in more than once, once per extra copy: conversations a source weight
    repeats, pretraining windows of a later pass over the corpus (mix.max_repeats)..."""
    copy_keys: np.ndarray
    """...each copy's own key (it packs and groups as an example of its own)..."""
    copy_lens: np.ndarray
    """...and how many of the example's tokens it takes (``WHOLE``, or the cut that ends the mix)."""


def plan_mix(train_meta: Any, windows: Any, *, mix: MixConfig, seed: int) -> MixPlan:
    """Exact token-ratio selection of training windows from ``windows`` (the kept pretraining windows' metadata);
    a corpus smaller than the target goes in again, up to mix.max_repeats passes, each later use a copy under its
    own key."""
    sft_tokens = int((train_meta["n_tokens"] * train_meta["copies"]).sum())
    target = pretrain_token_target(sft_tokens, ratio=mix.ratio)
    pool_meta = windows[~windows["heldout"]]
    pool_keys = [int(k) for k in pool_meta["key"]]
    passes = repeat_windows(
        pool_meta["n_tokens"].tolist(), pool_keys, target_tokens=target, max_repeats=mix.max_repeats, seed=seed
    )
    heldout_meta = windows[windows["heldout"]].nsmallest(mix.max_heldout_windows, "key")
    return MixPlan(
        target=target,
        passes=passes,
        takes={pool_keys[i]: n for i, n in passes[0]} if passes else {},
        repeats=[
            (pool_keys[i], stable_key("mix-repeat", pool_keys[i], p, seed=seed), n)
            for p, picked in enumerate(passes[1:], start=1)
            for i, n in picked
        ],
        heldout_keys=sorted(heldout_meta["key"].astype("uint64").tolist()),
    )


def plan_splits(
    meta: Any, train_meta: Any, val_meta: Any, *, mix: MixPlan, group_size: int, seed: int
) -> tuple[SplitPlan, dict[str, list[int]]]:
    """The plan of every output split and the sorted example keys of each (a copy under its own key). ``meta``: every
    conversation's metadata (a drop has a ``reason``; ``copies`` per example), ``train_meta``/``val_meta``: the ones
    each split takes."""
    repeated = train_meta[train_meta["copies"] > 1]
    copies = sorted(
        [
            (int(k), stable_key("copy", int(k), c, seed=seed), WHOLE)
            for k, n in zip(repeated["key"], repeated["copies"])
            for c in range(1, int(n))
        ]
        + mix.repeats
    )
    unused = meta[(meta["reason"] != "") | ((meta["split"] == "train") & (meta["copies"] == 0))]
    keys = {
        "train": sorted(train_meta["key"].tolist() + [c for _, c, _ in copies] + list(mix.takes)),
        "val": sorted(val_meta["key"].tolist()),
        "pretrain_heldout": mix.heldout_keys,
    }
    takes = sorted(mix.takes)
    plan = SplitPlan(
        bounds={name: _group_bounds(k, group_size) for name, k in keys.items()},
        take_keys=np.asarray(takes, dtype=np.uint64),
        take_lens=np.asarray([mix.takes[k] for k in takes], dtype=np.int64),
        heldout_keys=np.asarray(mix.heldout_keys, dtype=np.uint64),
        unused_keys=np.sort(unused["key"].to_numpy(dtype=np.uint64)),
        copy_of=np.asarray([k for k, _, _ in copies], dtype=np.uint64),
        copy_keys=np.asarray([c for _, c, _ in copies], dtype=np.uint64),
        copy_lens=np.asarray([n for _, _, n in copies], dtype=np.int64),
    )
    return plan, keys


def _group_bounds(keys: list[int], group_size: int) -> np.ndarray:
    return np.asarray(keys[::group_size][1:], dtype=np.uint64)


def tag_splits(batch: pa.Table, *, plan: SplitPlan) -> pa.Table:
    """Each example -> the same row with its output ``split`` and pack ``group``; one row out per row in, then the
    extra copies appended.

    Conversations keep the split the encoder gave them; pretraining windows go to train (cut to the tokens the mix
    takes) or to pretrain_heldout by key. A row that no split takes (a drop, an unused window) keeps its key with
    ``split=""`` and no tokens, so blocks never empty out before the shuffle.
    """
    keys = batch["key"].to_numpy().astype(np.uint64)
    ok = np.asarray(pc.equal(batch["reason"], "").to_numpy(zero_copy_only=False), dtype=bool)
    source_split = np.asarray(batch["split"].to_numpy(zero_copy_only=False), dtype=object)
    pretrain = source_split == "pretrain"
    take_at = np.minimum(np.searchsorted(plan.take_keys, keys), max(len(plan.take_keys) - 1, 0))
    taken = ok & pretrain & (plan.take_keys[take_at] == keys) if len(plan.take_keys) else np.zeros(len(keys), bool)
    heldout = ok & pretrain & np.isin(keys, plan.heldout_keys)
    unused = np.isin(keys, plan.unused_keys) & ~pretrain
    split = np.where(ok & ~pretrain & ~unused, source_split, "")
    split = np.where(taken, "train", split)
    split = np.where(heldout, "pretrain_heldout", split)
    group = np.full(len(keys), -1, dtype=np.int64)
    for name, bounds in plan.bounds.items():
        mine = split == name
        group[mine] = np.searchsorted(bounds, keys[mine], side="right")
    # Tokens each row keeps: none when no split takes it, the mix's share of a taken window, else all of them.
    lengths = np.asarray(pc.list_value_length(batch["input_ids"]).to_numpy(zero_copy_only=False), dtype=np.int64)
    keep = np.where(split == "", 0, lengths)
    keep[taken] = np.minimum(lengths[taken], plan.take_lens[take_at[taken]])
    tagged = {
        "input_ids": cut_lists(batch["input_ids"], keep),
        "labels": cut_lists(batch["labels"], keep),
        "kind": batch["kind"].to_numpy(),
        "key": keys,
        "split": split.astype(str),
        "group": group,
    }
    return _with_copies(batch, tagged, plan=plan, lengths=lengths)


def _with_copies(batch: pa.Table, tagged: dict[str, Any], *, plan: SplitPlan, lengths: np.ndarray) -> pa.Table:
    """The tagged rows of ``batch`` followed by the extra copies of its training examples (a source weight's, a
    later pass of the mix): the same tokens under their own keys, each cut to its own length."""
    keys, split = tagged["key"], tagged["split"]
    first, last = np.searchsorted(plan.copy_of, keys, "left"), np.searchsorted(plan.copy_of, keys, "right")
    pairs = [(i, j) for i in np.flatnonzero((last > first) & (split == "train")) for j in range(first[i], last[i])]
    source = np.asarray([i for i, _ in pairs], dtype=np.int64)
    copy_at = np.asarray([j for _, j in pairs], dtype=np.int64)
    copy_keys = plan.copy_keys[copy_at] if pairs else np.zeros(0, dtype=np.uint64)
    copy_keep = np.minimum(lengths[source], plan.copy_lens[copy_at]) if pairs else np.zeros(0, dtype=np.int64)
    kinds = tagged["kind"]
    return pa.table(
        {
            "input_ids": pa.concat_arrays([tagged["input_ids"], cut_lists(batch["input_ids"].take(source), copy_keep)]),
            "labels": pa.concat_arrays([tagged["labels"], cut_lists(batch["labels"].take(source), copy_keep)]),
            "kind": pa.array(np.concatenate([kinds, kinds[source]]), type=pa.int8()),
            "key": pa.array(np.concatenate([keys, copy_keys]), type=pa.uint64()),
            "split": pa.array(np.concatenate([split, ["train"] * len(source)]), type=pa.string()),
            "group": pa.array(
                np.concatenate([tagged["group"], np.searchsorted(plan.bounds["train"], copy_keys, side="right")]),
                type=pa.int64(),
            ),
        }
    )


def cut_lists(column: Any, keep: np.ndarray) -> pa.ListArray:
    """The first ``keep[i]`` values (at most its length) of each list ``i`` of an int32 list column, without a
    Python loop per row."""
    lists = int32_lists(column)
    offsets = lists.offsets.to_numpy()[: len(lists) + 1] if len(lists) else np.zeros(1, dtype=np.int32)
    values = lists.values.to_numpy()
    lengths = np.diff(offsets)
    starts = offsets[:-1]
    position = np.arange(offsets[-1] - offsets[0], dtype=np.int64) - np.repeat(starts - offsets[0], lengths)
    mask = position < np.repeat(keep, lengths)
    new_offsets = np.concatenate([[0], np.cumsum(keep)]).astype(np.int32)
    return pa.ListArray.from_arrays(
        pa.array(new_offsets), pa.array(values[offsets[0] : offsets[-1]][mask], type=pa.int32())
    )


def pack_group(batch: pa.Table, *, max_seq_len: int, packing: bool, seed: int) -> pa.Table:
    """One (split, pack group) of tagged rows -> packed rows of that split; the rows no split takes -> none."""
    split = batch["split"][0].as_py() if batch.num_rows else ""
    if not split:  # the rows no split takes
        examples = batch.slice(0, 0)
    else:
        examples = batch.take(pc.sort_indices(batch, [("key", "ascending")]))  # arrival order must not matter
    group = batch["group"][0].as_py() if examples.num_rows else 0
    table = pack_table(examples, max_seq_len=max_seq_len, packing=packing, seed=seed + group).cast(ROW_SCHEMA)
    return table.append_column("split", pa.array([split] * table.num_rows, type=pa.string()))
