"""``sftray.data.mixing``: stable keys, fraction splits, windows and the exact token-ratio selection (pure)."""

from __future__ import annotations

import random

import pytest

from sftray.data.mixing import (
    chunk_windows,
    in_fraction,
    pretrain_token_target,
    repeat_windows,
    select_windows,
    stable_key,
)


def test_stable_key_deterministic_and_seed_dependent() -> None:
    k = stable_key("a.jsonl:3", seed=0)
    assert k == stable_key("a.jsonl:3", seed=0)
    assert 0 <= k < 2**64
    assert k != stable_key("a.jsonl:3", seed=1)
    assert k != stable_key("a.jsonl:4", seed=0)
    assert stable_key("a", "b", seed=0) != stable_key("ab", seed=0)
    assert stable_key("val", 7, seed=3) == stable_key("val", "7", seed=3)  # parts are str()'d
    # the same on every machine and process: pinned value (blake2b, 8 bytes, big-endian)
    import hashlib

    expected = int.from_bytes(hashlib.blake2b(b"0\x1fa.jsonl:3", digest_size=8).digest(), "big")
    assert k == expected


def test_stable_keys_spread_over_key_space() -> None:
    keys = [stable_key(i, seed=5) for i in range(2000)]
    assert len(set(keys)) == 2000
    assert sum(k < 2**63 for k in keys) == pytest.approx(1000, abs=100)


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.1, 0.5, 0.9])
def test_in_fraction_share(fraction: float) -> None:
    keys = [stable_key("row", i, seed=11) for i in range(20_000)]
    share = sum(in_fraction(k, fraction) for k in keys) / len(keys)
    assert abs(share - fraction) <= 0.015


def test_in_fraction_edges() -> None:
    assert not in_fraction(0, 0.0)
    assert in_fraction(0, 1e-9)
    assert in_fraction(2**64 - 1, 1.0)
    assert not in_fraction(2**63, 0.5) and in_fraction(2**63 - 1, 0.5)


@pytest.mark.parametrize(("n", "window_len"), [(0, 4), (1, 4), (8, 4), (9, 4), (100, 7), (3, 100)])
def test_chunk_windows_cover_all_tokens_in_order(n: int, window_len: int) -> None:
    ids = list(range(1000, 1000 + n))
    windows = chunk_windows(ids, window_len=window_len)
    assert [t for w in windows for t in w] == ids
    assert all(len(w) == window_len for w in windows[:-1])
    assert all(0 < len(w) <= window_len for w in windows)
    assert len(windows) == -(-n // window_len)


def test_chunk_windows_exact_split() -> None:
    assert chunk_windows((1, 2, 3, 4, 5), window_len=2) == [[1, 2], [3, 4], [5]]


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.05, 0.1, 0.2, 1 / 3, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("sft", [0, 1, 7, 100, 999, 12_345, 10**7 + 3])
def test_pretrain_token_target_share(sft: int, ratio: float) -> None:
    p = pretrain_token_target(sft, ratio=ratio)
    assert isinstance(p, int) and p >= 0
    # P / (S + P) == ratio up to one token: |P - ratio * (S + P)| <= 1
    assert abs(p - ratio * (sft + p)) <= 1
    if ratio == 0:
        assert p == 0


def test_pretrain_token_target_known_values() -> None:
    assert pretrain_token_target(900, ratio=0.1) == 100
    assert pretrain_token_target(100, ratio=0.5) == 100
    assert pretrain_token_target(1000, ratio=0.0) == 0


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_pretrain_token_target_rejects_bad_ratio(ratio: float) -> None:
    with pytest.raises(ValueError) as info:
        pretrain_token_target(10, ratio=ratio)
    assert str(info.value) == f"mix ratio {ratio} must be in [0, 1)"


def _check_selection(lengths: list[int], keys: list[int], target: int, picked: list[tuple[int, int]]) -> None:
    assert sum(n for _, n in picked) == target
    idx = [i for i, _ in picked]
    assert len(set(idx)) == len(idx)
    # ascending key order
    assert [keys[i] for i in idx] == sorted(keys[i] for i in idx)
    # the picks are the smallest keys (a prefix of the key order)
    order = sorted(range(len(lengths)), key=lambda j: (keys[j], j))
    assert idx == order[: len(idx)]
    # only the last pick is partial, and every pick takes something
    for pos, (i, n) in enumerate(picked):
        assert 0 < n <= lengths[i]
        if pos < len(picked) - 1:
            assert n == lengths[i]


def test_select_windows_exact_and_ordered() -> None:
    lengths = [10, 10, 10, 10]
    keys = [40, 10, 30, 20]
    picked = select_windows(lengths, keys, target_tokens=25)
    assert picked == [(1, 10), (3, 10), (2, 5)]
    _check_selection(lengths, keys, 25, picked)


def test_select_windows_edges() -> None:
    assert select_windows([5, 5], [2, 1], target_tokens=0) == []
    assert select_windows([5, 5], [2, 1], target_tokens=10) == [(1, 5), (0, 5)]
    assert select_windows([5, 5], [2, 1], target_tokens=5) == [(1, 5)]
    # equal keys fall back to index order
    assert select_windows([3, 3, 3], [7, 7, 7], target_tokens=4) == [(0, 3), (1, 1)]


def test_select_windows_deterministic() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    keys = [stable_key("w", i, seed=9) for i in range(500)]
    first = select_windows(lengths, keys, target_tokens=5000)
    assert first == select_windows(list(lengths), list(keys), target_tokens=5000)
    _check_selection(lengths, keys, 5000, first)


def test_select_windows_corpus_too_small() -> None:
    with pytest.raises(ValueError) as info:
        select_windows([10, 20], [1, 2], target_tokens=31)
    assert str(info.value) == (
        "the pretraining corpus has 30 trainable tokens but the mix needs 31 (2 passes over it; mix.max_repeats=1 "
        "allows 1): add pretraining text, lower mix.ratio or set mix.max_repeats=2"
    )


def _check_passes(lengths: list[int], keys: list[int], target: int, passes: list[list[tuple[int, int]]]) -> None:
    """Each pass takes each window at most once; every pass but the last takes the whole corpus; the tokens add up."""
    assert sum(n for p in passes for _, n in p) == target
    for p in passes[:-1]:
        assert sorted(i for i, _ in p) == list(range(len(lengths)))
        assert all(n == lengths[i] for i, n in p)
    last = passes[-1]
    assert len({i for i, _ in last}) == len(last)
    assert all(0 < n <= lengths[i] for i, n in last)
    assert all(n == lengths[i] for i, n in last[:-1])  # only the very last window is cut


def test_repeat_windows_one_pass_is_select_windows() -> None:
    lengths, keys = [10, 10, 10, 10], [40, 10, 30, 20]
    assert repeat_windows(lengths, keys, target_tokens=25, max_repeats=1, seed=0) == [[(1, 10), (3, 10), (2, 5)]]
    assert repeat_windows(lengths, keys, target_tokens=25, max_repeats=4, seed=0) == [[(1, 10), (3, 10), (2, 5)]]
    assert repeat_windows(lengths, keys, target_tokens=0, max_repeats=2, seed=0) == []


def test_repeat_windows_reuses_the_corpus_in_passes() -> None:
    lengths, keys = [10, 20], [2, 1]
    passes = repeat_windows(lengths, keys, target_tokens=65, max_repeats=3, seed=0)
    assert len(passes) == 3
    assert passes[0] == [(1, 20), (0, 10)]
    _check_passes(lengths, keys, 65, passes)
    # the corpus exactly twice: two whole passes, nothing cut
    passes = repeat_windows(lengths, keys, target_tokens=60, max_repeats=2, seed=0)
    assert len(passes) == 2
    _check_passes(lengths, keys, 60, passes)


def test_repeat_windows_later_passes_are_reshuffled_and_seeded() -> None:
    rng = random.Random(5)
    lengths = [rng.randint(1, 64) for _ in range(200)]
    keys = [stable_key("w", i, seed=1) for i in range(200)]
    target = 2 * sum(lengths) + 100
    passes = repeat_windows(lengths, keys, target_tokens=target, max_repeats=3, seed=7)
    _check_passes(lengths, keys, target, passes)
    assert passes == repeat_windows(list(lengths), list(keys), target_tokens=target, max_repeats=3, seed=7)
    orders = [[i for i, _ in p] for p in passes[:2]]
    assert orders[0] != orders[1]  # a second pass is the corpus again, in another order
    assert passes[1] != repeat_windows(lengths, keys, target_tokens=target, max_repeats=3, seed=8)[1]


def test_repeat_windows_too_few_repeats_names_the_knob() -> None:
    with pytest.raises(ValueError) as info:
        repeat_windows([10, 20], [1, 2], target_tokens=65, max_repeats=2, seed=0)
    assert str(info.value) == (
        "the pretraining corpus has 30 trainable tokens but the mix needs 65 (3 passes over it; mix.max_repeats=2 "
        "allows 2): add pretraining text, lower mix.ratio or set mix.max_repeats=3"
    )
    with pytest.raises(ValueError, match=r"corpus has 0 trainable tokens.*add pretraining text"):
        repeat_windows([], [], target_tokens=5, max_repeats=3, seed=0)


def test_mix_share_property() -> None:
    """Over random corpora and ratios, the selected pretraining tokens make up ``ratio`` of all tokens (+-1 token)."""
    rng = random.Random(2024)
    for case in range(300):
        ratio = rng.choice([0.0, rng.uniform(0.0, 0.6), 0.05, 0.1, 0.2])
        sft = rng.choice([rng.randint(0, 50), rng.randint(0, 50_000)])
        window_len = rng.randint(8, 512)
        docs = [rng.randint(1, 3 * window_len) for _ in range(rng.randint(1, 60))]
        lengths = [len(w) for d in docs for w in chunk_windows(range(d), window_len=window_len)]
        keys = [stable_key("case", case, i, seed=case) for i in range(len(lengths))]
        target = pretrain_token_target(sft, ratio=ratio)
        if target > sum(lengths):
            with pytest.raises(ValueError, match="mix.ratio"):
                select_windows(lengths, keys, target_tokens=target)
            continue
        picked = select_windows(lengths, keys, target_tokens=target)
        _check_selection(lengths, keys, target, picked)
        p = sum(n for _, n in picked)
        assert abs(p - ratio * (sft + p)) <= 1, (case, sft, ratio, p)
        if sft + p >= 100:  # one token is at most one percentage point of 100 tokens
            assert abs(p / (sft + p) - ratio) <= 0.01, (case, sft, ratio, p)
