"""Unit tests of the pure packing functions (sftray.data.packing) and of collate_rows (sftray.data.collate)."""

from __future__ import annotations

import math
import random

import numpy as np
import pyarrow as pa
import pytest
import torch

from sftray.data.chat import IGNORE_INDEX
from sftray.data.collate import LENGTH_GROUP, collate_rows, length_grouped
from sftray.data.packing import KIND_PRETRAIN, KIND_SFT, pack_bfd, pack_examples, pack_table, pad_examples

# --------------------------------------------------------------------------------------------------------------------
# helpers


def _check_valid_packing(bins: list[list[int]], lengths: list[int], capacity: int) -> None:
    """No bin overflows, no bin is empty, and every index is used exactly once."""
    for b in bins:
        assert b, "empty bin"
        assert sum(lengths[i] for i in b) <= capacity
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(len(lengths)))


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """First fit in arrival order (the baseline BFD must not lose to)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(capacity - n)
    return bins


def _reference_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Naive O(n^2) best-fit decreasing with the documented tie-breaks (length desc then index; fullest bin, then
    lowest bin index)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        fits = [b for b in range(len(bins)) if free[b] >= n]
        if fits:
            b = min(fits, key=lambda c: (free[c], c))
        else:
            b = len(bins)
            bins.append([])
            free.append(capacity)
        bins[b].append(i)
        free[b] -= n
    return bins


def _long_tailed(rng: random.Random, n: int, capacity: int) -> list[int]:
    """Many short lengths, a few long ones (like chat SFT data)."""
    out = []
    for _ in range(n):
        if rng.random() < 0.85:
            out.append(rng.randint(8, capacity // 8))
        else:
            out.append(rng.randint(capacity // 3, capacity))
    return out


def _make_examples(rng: random.Random, lengths: list[int], *, with_kind: bool = True) -> list[dict]:
    """Examples whose first token is a unique id, so every example is recognisable inside a packed row."""
    exs = []
    for j, n in enumerate(lengths):
        ids = [10_000 + j] + [rng.randrange(1, 1000) for _ in range(n - 1)]
        labels = [t if rng.random() < 0.6 else IGNORE_INDEX for t in ids]
        ex = {"input_ids": ids, "labels": labels}
        if with_kind:
            ex["kind"] = KIND_PRETRAIN if j % 3 == 0 else KIND_SFT
        exs.append(ex)
    return exs


def _split(row: dict, key: str) -> list[list[int]]:
    out, start = [], 0
    for n in row["seq_lens"]:
        out.append(list(row[key][start : start + n]))
        start += n
    assert start == len(row[key])
    return out


def _ray_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """The shape Ray Data's iter_batches(batch_format="numpy") yields for variable-length list columns: one 1-D
    numpy object array per column, whose items are numpy int arrays."""
    out = {}
    for key in ("input_ids", "labels", "position_ids", "seq_lens", "seq_kinds"):
        col = np.empty(len(rows), dtype=object)
        for i, r in enumerate(rows):
            col[i] = np.asarray(r[key], dtype=np.int64)
        out[key] = col
    return out


def _list_batch(rows: list[dict]) -> dict[str, list]:
    return {key: [r[key] for r in rows] for key in ("input_ids", "labels", "position_ids", "seq_lens", "seq_kinds")}


BATCHERS = pytest.mark.parametrize("to_batch", [_list_batch, _ray_batch], ids=["lists", "ray_numpy"])


# --------------------------------------------------------------------------------------------------------------------
# pack_bfd


@pytest.mark.parametrize("seed", range(5))
def test_pack_bfd_valid_and_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    capacity = 256
    lengths = _long_tailed(rng, 300, capacity)
    bins = pack_bfd(lengths, capacity=capacity)
    _check_valid_packing(bins, lengths, capacity)
    assert bins == _reference_bfd(lengths, capacity)


def test_pack_bfd_deterministic_and_input_order_independent_count() -> None:
    rng = random.Random(7)
    lengths = _long_tailed(rng, 200, 512)
    a = pack_bfd(lengths, capacity=512)
    b = pack_bfd(list(lengths), capacity=512)
    assert a == b
    shuffled = lengths[:]
    rng.shuffle(shuffled)
    # BFD sorts first, so the bin count does not depend on arrival order
    assert len(pack_bfd(shuffled, capacity=512)) == len(a)


def test_pack_bfd_ties_are_broken_by_index() -> None:
    # equal lengths: placed in index order; two bins of equal free space: the lower bin index wins
    assert pack_bfd([3, 3, 3, 3], capacity=6) == [[0, 1], [2, 3]]
    assert pack_bfd([4, 4, 2, 2], capacity=6) == [[0, 2], [1, 3]]


@pytest.mark.parametrize(
    ("lengths", "capacity", "optimum"),
    [
        ([6, 4, 5, 5, 3, 7], 10, 3),  # (7,3) (6,4) (5,5)
        ([9, 1, 8, 2, 7, 3], 10, 3),
        ([3, 3, 3, 7, 7, 7], 10, 3),  # first fit in arrival order needs 4
        ([5, 5, 5, 5, 5], 10, 3),
        ([10, 10, 10], 10, 3),
        ([1] * 10, 10, 1),
        ([1] * 11, 10, 2),
        ([8, 2, 2, 2, 2, 2, 2], 10, 2),
        ([7], 7, 1),
        ([], 10, 0),
    ],
)
def test_pack_bfd_hits_known_optimum(lengths: list[int], capacity: int, optimum: int) -> None:
    bins = pack_bfd(lengths, capacity=capacity)
    _check_valid_packing(bins, lengths, capacity)
    assert len(bins) == optimum
    assert len(bins) == math.ceil(sum(lengths) / capacity)  # the trivial lower bound: these cases are tight


def test_pack_bfd_beats_first_fit_on_hand_case() -> None:
    lengths = [3, 3, 3, 7, 7, 7]
    assert len(_first_fit(lengths, 10)) == 4
    assert len(pack_bfd(lengths, capacity=10)) == 3


@pytest.mark.parametrize("seed", range(10))
def test_pack_bfd_at_least_as_good_as_first_fit_on_long_tail(seed: int) -> None:
    rng = random.Random(seed)
    capacity = 1024
    lengths = _long_tailed(rng, 500, capacity)
    bfd = pack_bfd(lengths, capacity=capacity)
    ff = _first_fit(lengths, capacity)
    _check_valid_packing(bfd, lengths, capacity)
    _check_valid_packing(ff, lengths, capacity)
    assert len(bfd) <= len(ff)
    lower = math.ceil(sum(lengths) / capacity)
    assert len(bfd) <= math.ceil(11 / 9 * lower) + 1  # within the classic FFD/BFD bound of the optimum


@pytest.mark.parametrize("bad", [0, -1, 11])
def test_pack_bfd_rejects_bad_lengths(bad: int) -> None:
    with pytest.raises(ValueError, match=rf"item 2 has length {bad}; .*capacity=10"):
        pack_bfd([3, 4, bad, 5], capacity=10)


# --------------------------------------------------------------------------------------------------------------------
# pack_examples / pad_examples


def _check_rows(rows: list[dict], examples: list[dict], max_seq_len: int) -> None:
    by_id = {ex["input_ids"][0]: ex for ex in examples}
    seen = []
    for row in rows:
        n = len(row["input_ids"])
        assert 0 < n <= max_seq_len
        assert len(row["labels"]) == len(row["position_ids"]) == n
        assert sum(row["seq_lens"]) == n
        assert len(row["seq_kinds"]) == len(row["seq_lens"])
        assert row["position_ids"] == [p for k in row["seq_lens"] for p in range(k)]
        for ids, labels, pos, kind in zip(
            _split(row, "input_ids"), _split(row, "labels"), _split(row, "position_ids"), row["seq_kinds"]
        ):
            ex = by_id[ids[0]]
            assert ids == ex["input_ids"]  # tokens intact and contiguous
            # labels intact and aligned, except the first: never a target, masked so no target crosses examples
            assert labels == [IGNORE_INDEX] + ex["labels"][1:]
            assert pos == list(range(len(ids)))  # positions restart at 0 at every example boundary
            assert kind == ex.get("kind", KIND_SFT)
            seen.append(ids[0])
    assert sorted(seen) == sorted(by_id)  # every example exactly once
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(ex["input_ids"]) for ex in examples)


@pytest.mark.parametrize("seed", [None, 0, 1])
def test_pack_examples_keeps_examples_intact(seed: int | None) -> None:
    rng = random.Random(3)
    lengths = _long_tailed(rng, 120, 128)
    examples = _make_examples(rng, lengths)
    rows = pack_examples(examples, max_seq_len=128, seed=seed)
    _check_rows(rows, examples, 128)
    assert len(rows) == len(pack_bfd(lengths, capacity=128))


def test_pack_examples_default_kind_is_sft() -> None:
    rng = random.Random(0)
    examples = _make_examples(rng, [4, 5, 6], with_kind=False)
    rows = pack_examples(examples, max_seq_len=32)
    assert len(rows) == 1
    assert rows[0]["seq_kinds"] == [KIND_SFT] * 3
    assert rows[0]["seq_lens"] == [6, 5, 4]  # BFD order: longest first


def test_pack_examples_without_seed_is_bfd_order() -> None:
    rng = random.Random(5)
    lengths = _long_tailed(rng, 60, 64)
    examples = _make_examples(rng, lengths)
    rows = pack_examples(examples, max_seq_len=64)
    bins = pack_bfd(lengths, capacity=64)
    assert [[ex_id - 10_000 for ex_id in (ids[0] for ids in _split(r, "input_ids"))] for r in rows] == bins


def test_pack_examples_seeded_shuffle_is_deterministic() -> None:
    rng = random.Random(11)
    lengths = _long_tailed(rng, 200, 64)
    examples = _make_examples(rng, lengths)
    a = pack_examples(examples, max_seq_len=64, seed=42)
    b = pack_examples(examples, max_seq_len=64, seed=42)
    c = pack_examples(examples, max_seq_len=64, seed=43)
    plain = pack_examples(examples, max_seq_len=64)
    assert a == b
    assert a != c and a != plain  # the shuffle does something (overwhelmingly likely with this many rows)

    def key(r):
        return r["input_ids"]

    assert sorted(a, key=key) == sorted(c, key=key) == sorted(plain, key=key)  # same rows, different order


def test_pack_examples_rejects_mismatched_labels_and_oversize() -> None:
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        pack_examples([{"input_ids": [1, 2, 3], "labels": [1, 2]}], max_seq_len=8)
    with pytest.raises(ValueError, match="capacity=4"):
        pack_examples([{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]}], max_seq_len=4)


def test_pad_examples_one_row_per_example() -> None:
    rng = random.Random(2)
    lengths = [5, 1, 9, 3]
    examples = _make_examples(rng, lengths)
    rows = pad_examples(examples)
    assert len(rows) == len(examples)
    for row, ex in zip(rows, examples):  # same order as the input
        assert row["input_ids"] == ex["input_ids"]
        assert row["labels"] == [IGNORE_INDEX] + ex["labels"][1:]
        assert row["position_ids"] == list(range(len(ex["input_ids"])))
        assert row["seq_lens"] == [len(ex["input_ids"])]
        assert row["seq_kinds"] == [ex["kind"]]
    _check_rows(rows, examples, max(lengths))


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("seed", [None, 7])
def test_pack_table_makes_the_rows_of_pack_examples(packing: bool, seed: int | None) -> None:
    """The pipeline's Arrow packer and the list packer give identical rows in identical order, counts included,
    also from a slice of a larger table (offsets that do not start at 0)."""
    rng = random.Random(13)
    examples = _make_examples(rng, _long_tailed(rng, 300, 96))
    for ex in examples:  # targets on some tokens only, as a chat's mask leaves them
        ex["labels"] = [x if rng.random() < 0.6 else IGNORE_INDEX for x in ex["labels"]]
    table = pa.Table.from_pylist(examples).slice(40, 200)
    want = pack_examples(examples[40:240], max_seq_len=96, seed=seed) if packing else pad_examples(examples[40:240])
    for row in want:
        row["num_tokens"] = len(row["input_ids"])
        row["num_trained"] = sum(1 for x in row["labels"] if x != IGNORE_INDEX)
        row["num_pretrain_tokens"] = sum(n for n, k in zip(row["seq_lens"], row["seq_kinds"]) if k == KIND_PRETRAIN)
    got = pack_table(table, max_seq_len=96, packing=packing, seed=seed)
    assert got.to_pylist() == want
    assert any(r["num_pretrain_tokens"] for r in want) and any(r["num_trained"] < r["num_tokens"] for r in want)


def test_pack_table_rejects_mismatched_labels_and_empty_examples() -> None:
    bad = pa.table({"input_ids": [[1, 2, 3]], "labels": [[1, 2]], "kind": [KIND_SFT]})
    with pytest.raises(ValueError, match="example 0 has 3 input_ids but a different number of labels"):
        pack_table(bad, max_seq_len=8, packing=True)
    empty = pa.table({"input_ids": [[1], []], "labels": [[1], []], "kind": [KIND_SFT, KIND_SFT]})
    with pytest.raises(ValueError, match="example 1 has no tokens"):
        pack_table(empty, max_seq_len=8, packing=False)


# --------------------------------------------------------------------------------------------------------------------
# collate_rows


@BATCHERS
@pytest.mark.parametrize("pad_to", [None, 40])
def test_collate_packed(to_batch, pad_to: int | None) -> None:
    rng = random.Random(8)
    examples = _make_examples(rng, [7, 12, 3, 15, 9, 20, 4, 1])
    rows = pack_examples(examples, max_seq_len=32)
    pad_id = 0
    out = collate_rows(to_batch(rows), pad_id=pad_id, packed=True, pad_to=pad_to)
    width = pad_to or max(len(r["input_ids"]) for r in rows)
    assert "attention_mask" not in out
    assert set(out) == {"input_ids", "labels", "position_ids", "token_kind"}
    for key, t in out.items():
        assert t.dtype == torch.long, key
        assert t.shape == (len(rows), width), key
    for i, row in enumerate(rows):
        k = len(row["input_ids"])
        assert out["input_ids"][i, :k].tolist() == row["input_ids"]
        assert out["labels"][i, :k].tolist() == row["labels"]
        assert out["position_ids"][i, :k].tolist() == row["position_ids"]
        # padded tail: pad tokens, no loss, its own sequence with positions restarting at 0
        assert (out["input_ids"][i, k:] == pad_id).all()
        assert (out["labels"][i, k:] == IGNORE_INDEX).all()
        assert out["position_ids"][i, k:].tolist() == list(range(width - k))
        expected_kind = [kind for n, kind in zip(row["seq_lens"], row["seq_kinds"]) for _ in range(n)]
        assert out["token_kind"][i].tolist() == expected_kind + [0] * (width - k)
    assert {1, 2} <= set(out["token_kind"].unique().tolist())  # both kinds exercised


@BATCHERS
def test_collate_padded_attention_mask(to_batch) -> None:
    rng = random.Random(9)
    examples = _make_examples(rng, [6, 2, 11, 5])
    rows = pad_examples(examples)
    out = collate_rows(to_batch(rows), pad_id=0, packed=False, pad_to=16)
    assert set(out) == {"input_ids", "labels", "position_ids", "token_kind", "attention_mask"}
    assert out["attention_mask"].shape == (4, 16)
    assert out["attention_mask"].dtype == torch.long
    for i, ex in enumerate(examples):
        k = len(ex["input_ids"])
        assert out["attention_mask"][i].tolist() == [1] * k + [0] * (16 - k)
        assert out["input_ids"][i].tolist() == ex["input_ids"] + [0] * (16 - k)
        assert out["labels"][i].tolist() == [IGNORE_INDEX] + ex["labels"][1:] + [IGNORE_INDEX] * (16 - k)
        assert out["position_ids"][i, :k].tolist() == list(range(k))
        assert out["token_kind"][i].tolist() == [ex["kind"]] * k + [0] * (16 - k)


@BATCHERS
@pytest.mark.parametrize("packed", [True, False])
def test_collate_pad_equal_to_eos_keeps_trained_eos(to_batch, packed: bool) -> None:
    eos = 2
    examples = [
        {"input_ids": [1, 50, 51, 52, eos], "labels": [IGNORE_INDEX, IGNORE_INDEX, 51, 52, eos]},
        {"input_ids": [1, 60, eos], "labels": [IGNORE_INDEX, 60, eos]},
    ]
    rows = pack_examples(examples, max_seq_len=12) if packed else pad_examples(examples)
    out = collate_rows(to_batch(rows), pad_id=eos, packed=packed, pad_to=12)
    for i, row in enumerate(rows):
        k = len(row["input_ids"])
        ends = np.cumsum(row["seq_lens"]) - 1
        for e in ends:  # the eos that ends every example is a real token and stays trained
            assert out["input_ids"][i, e] == eos
            assert out["labels"][i, e] == eos
        assert (out["input_ids"][i, k:] == eos).all()  # the pad tokens are eos too ...
        assert (out["labels"][i, k:] == IGNORE_INDEX).all()  # ... yet only they are ignored (masked by position)
        if not packed:
            assert out["attention_mask"][i].tolist() == [1] * k + [0] * (12 - k)
    trained_eos = int((out["labels"] == eos).sum())
    assert trained_eos == 2


@BATCHERS
@pytest.mark.parametrize("packed", [True, False])
def test_collate_pad_to_shorter_than_row_raises(to_batch, packed: bool) -> None:
    rows = pad_examples([{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]}])
    with pytest.raises(ValueError, match="pad_to=4"):
        collate_rows(to_batch(rows), pad_id=0, packed=packed, pad_to=4)


@BATCHERS
def test_collate_pad_to_exact_row_length_has_no_tail(to_batch) -> None:
    rows = pack_examples(
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}], max_seq_len=5
    )
    out = collate_rows(to_batch(rows), pad_id=0, packed=True, pad_to=5)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert out["token_kind"].tolist() == [[KIND_SFT] * 5]


# --------------------------------------------------------------------------------------------------------------------
# length_grouped


@BATCHERS
@pytest.mark.parametrize(("n", "size"), [(17, 4), (16, 4), (3, 4), (1, 1)])
def test_length_grouped_keeps_every_row_once_in_ceil_micro_batches(to_batch, n: int, size: int) -> None:
    rng = random.Random(11)
    rows = pad_examples(_make_examples(rng, [rng.randint(1, 40) for _ in range(n)]))
    groups = list(length_grouped(to_batch(rows), size=size, rng=random.Random(0)))
    assert len(groups) == math.ceil(n / size)
    assert sorted(len(g["input_ids"]) for g in groups)[-1] == min(size, n)
    assert sum(len(g["input_ids"]) < size for g in groups) <= 1  # only the last cut may be short
    firsts = sorted(int(ids[0]) for g in groups for ids in g["input_ids"])
    assert firsts == sorted(10_000 + j for j in range(n))  # every row exactly once
    for g in groups:  # columns stay aligned row by row
        for ids, labels, lens in zip(g["input_ids"], g["labels"], g["seq_lens"]):
            assert len(ids) == len(labels) == sum(int(x) for x in lens)


def test_length_grouped_puts_similar_lengths_together_in_shuffled_order() -> None:
    rng = random.Random(12)
    rows = pad_examples(_make_examples(rng, [rng.randint(1, 200) for _ in range(64)]))
    batch = _list_batch(rows)
    groups = list(length_grouped(batch, size=8, rng=random.Random(1)))
    spans = sorted((min(map(len, g["input_ids"])), max(map(len, g["input_ids"]))) for g in groups)
    for (_, hi), (lo, _) in zip(spans, spans[1:]):  # the length ranges of the micro-batches do not overlap
        assert hi <= lo
    longest = [max(map(len, g["input_ids"])) for g in groups]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # not emitted in length order
    again = [max(map(len, g["input_ids"])) for g in length_grouped(batch, size=8, rng=random.Random(1))]
    assert again == longest  # deterministic for a seed


def test_length_grouped_packing_pads_less_than_plain_micro_batches() -> None:
    """Examples of 20-48 tokens leave gaps in 256-token rows that no example fits; grouped by length, the partly
    filled rows share micro-batches padded to their longest row, which halves the padding at least."""
    rng = random.Random(13)
    examples = _make_examples(rng, [rng.randint(20, 48) for _ in range(3000)])
    rows = pack_examples(examples, max_seq_len=256, seed=0)
    tokens = sum(len(r["input_ids"]) for r in rows)

    def pad_share(groups) -> float:
        slots = sum(len(g["input_ids"]) * max(map(len, g["input_ids"])) for g in groups)
        return 1 - tokens / slots

    size, window = 4, 4 * LENGTH_GROUP
    plain = [_list_batch(rows[i : i + size]) for i in range(0, len(rows), size)]
    grouped = [
        g
        for i in range(0, len(rows), window)
        for g in length_grouped(_list_batch(rows[i : i + window]), size=size, rng=random.Random(i))
    ]
    assert pad_share(plain) > 0.005  # the data does leave gaps
    assert pad_share(grouped) < pad_share(plain) / 2
