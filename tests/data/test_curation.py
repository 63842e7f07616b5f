"""``sftray.data.curation``: exact and near duplicates, train/eval overlap, filters and per-source token weights (pure)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from testkit import chat

from sftray.config import DataConfig
from sftray.data.curation import (
    FILTER_REASONS,
    exact_hash,
    filter_reason,
    find_duplicates,
    lsh_params,
    minhash_bands,
    normalized_text,
    select_by_weight,
    token_shares,
)

NEAR = {"threshold": 0.8, "num_perm": 128, "shingle_words": 3, "seed": 0}  # data.dedup=near at the defaults


def jaccard(a: str, b: str, k: int = 3) -> float:
    """The true Jaccard similarity of two texts' sets of k-word shingles (what MinHash estimates)."""

    def shingles(text: str) -> set[tuple[str, ...]]:
        words = text.lower().split()
        return {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


# --- exact duplicates ---------------------------------------------------------------------------------------------


def test_normalized_text_folds_whitespace_and_case_only() -> None:
    messages = chat("  What is\t2 + 2?\n", "It is FOUR.\n\nReally.")
    assert normalized_text(messages) == "user: what is 2 + 2?\nassistant: it is four. really."
    assert normalized_text(chat("STRASSE", "x")) == normalized_text(chat("straße", "x"))  # casefold, not lower


def test_exact_hash_equal_for_whitespace_and_case_variants_only() -> None:
    h = exact_hash(chat("What is 2 + 2?", "It is four."))
    assert h == exact_hash(chat("what  is 2 +\n2? ", "IT IS FOUR."))
    assert h != exact_hash(chat("What is 2 + 2?", "It is five."))  # content
    assert h != exact_hash(chat("What is 2 + 2?", "It is four"))  # punctuation is content
    assert h != exact_hash(chat("What is 2 + 2? It is four.", ""))  # where the turn ends
    assert h != exact_hash([{"role": "system", "content": "What is 2 + 2?"}, chat("", "It is four.")[1]])  # role
    assert 0 <= h < 2**64 and int(np.uint64(h)) == h


def test_exact_duplicates_keep_the_first_in_file_order() -> None:
    rows = [chat("a", "b"), chat("c", "d"), chat("A", " b "), chat("c", "d"), chat("e", "f"), chat("a", "b")]
    dropped = find_duplicates([[exact_hash(m)] for m in rows], splits=["train"] * len(rows))
    assert dropped == {2: ("duplicate", 0), 3: ("duplicate", 1), 5: ("duplicate", 0)}


# --- near duplicates ----------------------------------------------------------------------------------------------


def _vocabulary(rng: random.Random, size: int = 4000) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))))
    return sorted(words)


def _corpus(seed: int = 0, n_base: int = 200) -> tuple[list[str], list[str], list[str]]:
    """(base answers' prompts, base answers, spare words): 12-word prompts and 40-word answers, no word repeated
    within a conversation, so the shingle counts below are exact."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    prompts, answers = [], []
    for _ in range(n_base):
        words = rng.sample(vocab, 52)
        prompts.append(" ".join(words[:12]))
        answers.append(" ".join(words[12:]))
    return prompts, answers, vocab


def _changed(answer: str, position: int, new: str) -> str:
    words = answer.split()
    words[position] = new
    return " ".join(words)


def test_near_copies_are_found_and_unrelated_rows_kept() -> None:
    prompts, answers, vocab = _corpus()
    rng = random.Random(1)
    rows = [chat(p, a) for p, a in zip(prompts, answers)]  # 200 varied conversations, rows 0..199
    # A near copy changes the last word of the 40-word answer. The text "user: <12> assistant: <40>" has 54 words,
    # 52 shingles; the change replaces one shingle, so Jaccard = 51 / 53 = 0.962 (LSH 9x13: found w.p. 0.9998).
    copies = {}
    for base in range(0, 200, 5):
        copies[len(rows)] = base
        rows.append(chat(prompts[base], _changed(answers[base], 39, rng.choice(vocab) + "x")))
    # An unrelated row shares the prompt and the first 8 answer words with a base row and nothing else: 20 of 52
    # shingles, so Jaccard = 20 / 84 = 0.238 (found w.p. 9 x 0.238**13 < 1e-7).
    unrelated = []
    for base in range(2, 200, 5):
        unrelated.append(len(rows))
        tail = " ".join(rng.sample(vocab, 32))
        rows.append(chat(prompts[base], " ".join(answers[base].split()[:8]) + " " + tail))
    texts = [normalized_text(m) for m in rows]
    near = [jaccard(texts[c], texts[b]) for c, b in copies.items()]
    far = [jaccard(texts[u], texts[b]) for u, b in zip(unrelated, range(2, 200, 5))]
    assert min(near) == pytest.approx(51 / 53, abs=0.002) and max(far) == pytest.approx(20 / 84, abs=0.01)

    hashes = [minhash_bands(t, **NEAR) for t in texts]
    dropped = find_duplicates(hashes, splits=["train"] * len(rows))
    assert dropped == {c: ("duplicate", b) for c, b in copies.items()}  # every copy, and nothing unrelated
    assert not set(dropped) & set(unrelated)


def test_near_detection_follows_the_lsh_probability() -> None:
    """A middle word changed: 3 of 52 shingles replaced, Jaccard = 49 / 55 = 0.891, found with the LSH probability
    1 - (1 - 0.891**13)**9 = 0.90: a wrong band hash (too strict or too loose) moves the rate far off it."""
    prompts, answers, vocab = _corpus(seed=2, n_base=600)
    rng = random.Random(3)
    found = 0
    for p, a in zip(prompts, answers):
        base, copy = normalized_text(chat(p, a)), normalized_text(chat(p, _changed(a, 20, rng.choice(vocab) + "x")))
        assert jaccard(base, copy) == pytest.approx(49 / 55)
        found += bool(set(minhash_bands(base, **NEAR)) & set(minhash_bands(copy, **NEAR)))
    bands, rows = lsh_params(0.8, 128)
    p_found = 1 - (1 - (49 / 55) ** rows) ** bands
    sd = (600 * p_found * (1 - p_found)) ** 0.5  # 7.5 pairs; 11 rows per band instead of 13 would find 31 more
    assert abs(found - 600 * p_found) < 3.5 * sd, (found, 600 * p_found)


def test_lsh_params_and_band_hashes() -> None:
    assert lsh_params(0.8, 128) == (9, 13)  # datasketch's optimum for equal FP/FN weights
    for threshold, num_perm in ((0.5, 16), (0.8, 64), (0.95, 256)):
        bands, rows = lsh_params(threshold, num_perm)
        assert bands >= 1 and rows >= 1 and bands * rows <= num_perm
    text = "the quick brown fox jumps over the lazy dog"
    bands = minhash_bands(text, **NEAR)
    assert len(bands) == 9 and len(set(bands)) == 9 and all(0 <= b < 2**64 for b in bands)
    assert bands == minhash_bands(text.upper(), **NEAR)  # words are lowercased
    assert set(bands).isdisjoint(minhash_bands(text, **{**NEAR, "seed": 1}))  # the seed changes every band
    assert set(bands).isdisjoint(minhash_bands("an entirely different sentence about ray data", **NEAR))
    # fewer words than a shingle: the whole text is one shingle, so only the same short text matches
    assert minhash_bands("ok thanks", **NEAR) == minhash_bands("OK  thanks", **NEAR)
    assert set(minhash_bands("ok thanks", **NEAR)).isdisjoint(minhash_bands("ok thank you", **NEAR))


def test_duplicates_are_connected_components() -> None:
    # rows 0 and 1 share key 10, rows 1 and 2 share key 20: row 2 is dropped as a copy of row 0 through row 1
    hashes = [[10, 1], [10, 20], [20, 3], [4, 5], [], [2**64 - 1], [2**64 - 1]]
    assert find_duplicates(hashes, splits=["train"] * 7) == {
        1: ("duplicate", 0),
        2: ("duplicate", 0),
        6: ("duplicate", 5),
    }
    as_array = np.array([[10, 1], [10, 20], [20, 3], [4, 5]], dtype=np.uint64)
    assert find_duplicates(as_array, splits=["train"] * 4) == {1: ("duplicate", 0), 2: ("duplicate", 0)}
    assert find_duplicates([[1], [2]], splits=["train", "train"]) == {}
    with pytest.raises(ValueError, match="3 rows of hashes but 2 splits"):
        find_duplicates([[1], [2], [3]], splits=["train", "val"])


# --- train / eval overlap -----------------------------------------------------------------------------------------


def test_train_copy_of_val_row_is_dropped_even_when_it_comes_first() -> None:
    a, b, c = chat("q1", "a1"), chat("q2", "a2"), chat("q3", "a3")
    rows = [a, b, chat("Q1", "A1"), c, chat("q2 ", "a2"), chat("q3", "A3"), a]
    splits = ["train", "train", "val", "train", "probe", "train", "train"]
    dropped = find_duplicates([[exact_hash(m)] for m in rows], splits=splits)
    assert dropped == {
        0: ("duplicate_of_eval", 2),  # before its val copy in file order, still dropped
        6: ("duplicate_of_eval", 2),
        1: ("duplicate_of_eval", 4),  # a probe counts as eval too
        5: ("duplicate", 3),
    }
    assert list(dropped) == sorted(dropped)


def test_eval_rows_are_never_dropped_and_the_first_eval_row_is_named() -> None:
    splits = ["train", "val", "probe", "val", "train"]
    assert find_duplicates([[7]] * 5, splits=splits) == {0: ("duplicate_of_eval", 1), 4: ("duplicate_of_eval", 1)}
    assert find_duplicates([[7]] * 3, splits=["val", "probe", "val"]) == {}


def test_near_train_copy_of_val_row_is_dropped() -> None:
    prompts, answers, _ = _corpus(seed=4, n_base=3)
    texts = [
        normalized_text(chat(prompts[0], _changed(answers[0], 39, "different"))),  # train, near copy of row 2
        normalized_text(chat(prompts[1], answers[1])),
        normalized_text(chat(prompts[0], answers[0])),  # val
    ]
    dropped = find_duplicates([minhash_bands(t, **NEAR) for t in texts], splits=["train", "train", "val"])
    assert dropped == {0: ("duplicate_of_eval", 2)}


# --- filters ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "inside", "outside", "reason", "message"),
    [
        (
            {"min_assistant_tokens": 4},
            {"n_trained": 4, "n_tokens": 20, "n_turns": 1},
            {"n_trained": 3, "n_tokens": 20, "n_turns": 1},
            "too_few_assistant_tokens",
            "3 assistant tokens < data.min_assistant_tokens=4",
        ),
        (
            {"max_assistant_tokens": 10},
            {"n_trained": 10, "n_tokens": 20, "n_turns": 1},
            {"n_trained": 11, "n_tokens": 20, "n_turns": 1},
            "too_many_assistant_tokens",
            "11 assistant tokens > data.max_assistant_tokens=10",
        ),
        (
            {"max_turns": 2},
            {"n_trained": 5, "n_tokens": 20, "n_turns": 2},
            {"n_trained": 5, "n_tokens": 20, "n_turns": 3},
            "too_many_turns",
            "3 assistant turns > data.max_turns=2",
        ),
        (
            {"min_assistant_ratio": 0.5},
            {"n_trained": 5, "n_tokens": 15, "n_turns": 1},  # 5 / 10 prompt tokens = 0.5
            {"n_trained": 5, "n_tokens": 16, "n_turns": 1},  # 5 / 11 = 0.455
            "low_assistant_ratio",
            "5 assistant / 11 prompt tokens = 0.455 < data.min_assistant_ratio=0.5",
        ),
    ],
    ids=lambda x: x if isinstance(x, str) and x in FILTER_REASONS else None,
)
def test_each_filter_at_its_boundary(knobs: dict, inside: dict, outside: dict, reason: str, message: str) -> None:
    data = DataConfig(**knobs)
    assert filter_reason(**inside, data=data) is None
    assert filter_reason(**outside, data=data) == (reason, message)
    assert filter_reason(**outside, data=DataConfig()) is None  # the defaults filter nothing


def test_filters_defaults_pass_extremes_and_order() -> None:
    assert FILTER_REASONS == (
        "too_few_assistant_tokens",
        "too_many_assistant_tokens",
        "too_many_turns",
        "low_assistant_ratio",
    )
    assert filter_reason(n_trained=0, n_tokens=10**6, n_turns=10**3, data=DataConfig()) is None
    strict = DataConfig(min_assistant_tokens=4, max_turns=1, min_assistant_ratio=0.5)
    assert filter_reason(n_trained=3, n_tokens=100, n_turns=5, data=strict)[0] == "too_few_assistant_tokens"
    assert filter_reason(n_trained=5, n_tokens=100, n_turns=5, data=strict)[0] == "too_many_turns"
    assert filter_reason(n_trained=5, n_tokens=5, n_turns=1, data=strict) is None  # no prompt tokens: no ratio


# --- per-source weights -------------------------------------------------------------------------------------------


def _examples(n: int, seed: int, mean: float = 5.0, sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    n_tokens = np.maximum(1, rng.lognormal(mean, sigma, size=n).astype(np.int64))
    return keys, n_tokens


@pytest.mark.parametrize(("weight", "max_rows"), [(0.5, None), (1.0, None), (2.5, None), (1.0, 100), (0.5, 100)])
def test_select_by_weight_hits_its_token_target(weight: float, max_rows: int | None) -> None:
    keys, n_tokens = _examples(500, seed=0)
    copies = select_by_weight(keys, n_tokens, weight=weight, max_rows=max_rows)
    assert copies.shape == (500,) and copies.dtype.kind == "i"
    by_key = np.argsort(keys)
    kept = by_key[: max_rows or 500]
    assert (copies[by_key[len(kept) :]] == 0).all()  # max_rows keeps the first examples by key, no others
    target = weight * n_tokens[kept].sum()
    achieved = int((copies * n_tokens).sum())
    assert abs(achieved - target) <= n_tokens[kept].max() / 2, (achieved, target)  # within half an example
    # floor(weight) copies each, one more for a prefix in key order
    extra = copies[kept] - int(weight)
    assert set(extra.tolist()) <= {0, 1} and (np.diff(extra) <= 0).all()
    assert (select_by_weight(keys, n_tokens, weight=weight, max_rows=max_rows) == copies).all()  # deterministic
    shuffled = np.random.default_rng(1).permutation(500)  # the input order does not matter, the keys do
    assert (
        select_by_weight(keys[shuffled], n_tokens[shuffled], weight=weight, max_rows=max_rows) == copies[shuffled]
    ).all()


def test_select_by_weight_values() -> None:
    keys = np.array([30, 10, 20, 40], dtype=np.uint64)
    n_tokens = np.array([5, 10, 10, 5])  # in key order: 10, 10, 5, 5 = 30 tokens
    assert select_by_weight(keys, n_tokens, weight=1.0, max_rows=None).tolist() == [1, 1, 1, 1]
    assert select_by_weight(keys, n_tokens, weight=0.5, max_rows=None).tolist() == [0, 1, 0, 0]  # 10 of 15
    assert select_by_weight(keys, n_tokens, weight=2.5, max_rows=None).tolist() == [2, 3, 2, 2]  # 70 of 75
    assert select_by_weight(keys, n_tokens, weight=0.7, max_rows=None).tolist() == [0, 1, 1, 0]  # 20 of 21
    assert select_by_weight(keys, n_tokens, weight=1.0, max_rows=2).tolist() == [0, 1, 1, 0]
    assert select_by_weight(keys, n_tokens, weight=0.1, max_rows=None).tolist() == [0, 0, 0, 0]  # 0 nearer 3 than 10
    assert select_by_weight(keys[:0], n_tokens[:0], weight=2.0, max_rows=None).tolist() == []
    other_seed = np.array([3, 4, 2, 1], dtype=np.uint64)  # other keys (seed): another half
    assert select_by_weight(other_seed, n_tokens, weight=0.5, max_rows=None).tolist() == [0, 0, 1, 1]  # 15 of 15
    with pytest.raises(ValueError, match="weight=0 must be > 0"):
        select_by_weight(keys, n_tokens, weight=0, max_rows=None)
    with pytest.raises(ValueError, match="max_rows=0 must be >= 1"):
        select_by_weight(keys, n_tokens, weight=1.0, max_rows=0)


def test_two_sources_reach_their_weighted_token_shares() -> None:
    """Target share of source s: w_s * T_s / sum(w * T), T its tokens; achieved within 1 point on ~2000 examples."""
    sources = {
        "chat": (*_examples(1200, seed=5, mean=5.0, sigma=1.0), 2.0),
        "code": (*_examples(800, seed=6, mean=6.0, sigma=0.8), 0.3),
    }
    achieved, weighted = {}, {}
    for name, (keys, n_tokens, weight) in sources.items():
        copies = select_by_weight(keys, n_tokens, weight=weight, max_rows=None)
        achieved[name] = int((copies * n_tokens).sum())
        weighted[name] = weight * int(n_tokens.sum())
    targets = {name: w / sum(weighted.values()) for name, w in weighted.items()}
    shares = token_shares(achieved)
    assert shares == pytest.approx(targets, abs=0.01)
    unweighted = token_shares({name: int(n.sum()) for name, (_, n, _) in sources.items()})
    assert abs(unweighted["chat"] - targets["chat"]) > 0.1  # the weights matter: without them the shares are far off


def test_token_shares() -> None:
    assert token_shares({"a": 1, "b": 3}) == {"a": 0.25, "b": 0.75}
    assert token_shares({"a": 0, "b": 0}) == {"a": 0.0, "b": 0.0}
    assert token_shares({}) == {}
