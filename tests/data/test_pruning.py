"""Loss-based pruning's pure parts: which keys go and why, the score summary, the cache key, and the label noise
the pruning tests inject (no Ray)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sftray.data.drops import POLICY_DROPS
from sftray.data.noise import corrupt_answers
from sftray.data.pruning import (
    HIGH_LOSS,
    HISTOGRAM_BINS,
    LOW_LOSS,
    PRUNE_REASONS,
    scores_key,
    select_pruned,
    summary,
)


def test_the_highest_and_lowest_shares_go_with_their_reasons():
    keys = list(range(100, 120))
    losses = [float(i) for i in range(20)]  # key 100 + i has loss i
    pruned = select_pruned(keys, losses, drop_highest=0.1, drop_lowest=0.25)
    assert pruned == {
        118: HIGH_LOSS,
        119: HIGH_LOSS,
        100: LOW_LOSS,
        101: LOW_LOSS,
        102: LOW_LOSS,
        103: LOW_LOSS,
        104: LOW_LOSS,
    }


def test_shares_round_down_and_floating_point_does_not_lose_one():
    keys = list(range(1900))
    losses = np.random.default_rng(0).random(1900)
    assert len(select_pruned(keys, losses, drop_highest=0.1, drop_lowest=0.0)) == 190  # 0.1 x 1900 = 190.00000000000003
    assert len(select_pruned(keys[:100], losses[:100], drop_highest=0.29, drop_lowest=0.0)) == 29  # 28.999999999999996
    assert len(select_pruned(keys[:9], losses[:9], drop_highest=0.1, drop_lowest=0.1)) == 0  # 0.9 each: none
    assert select_pruned(keys, losses, drop_highest=0.0, drop_lowest=0.0) == {}


def test_ties_are_broken_by_key_whatever_the_input_order():
    keys = list(range(10))
    losses = [1.0] * 10
    pruned = select_pruned(keys, losses, drop_highest=0.2, drop_lowest=0.3)
    assert pruned == {8: HIGH_LOSS, 9: HIGH_LOSS, 0: LOW_LOSS, 1: LOW_LOSS, 2: LOW_LOSS}
    rng = random.Random(0)
    for _ in range(5):
        order = rng.sample(range(10), 10)
        shuffled = select_pruned(
            [keys[i] for i in order], [losses[i] for i in order], drop_highest=0.2, drop_lowest=0.3
        )
        assert shuffled == pruned


def test_unscored_conversations_are_never_pruned_nor_counted():
    keys = [1, 2, 3, 4, 5, 6]
    losses = [float("nan"), 9.0, 1.0, 2.0, 3.0, float("nan")]
    assert select_pruned(keys, losses, drop_highest=0.25, drop_lowest=0.25) == {2: HIGH_LOSS, 3: LOW_LOSS}
    stats = summary(losses, {2: HIGH_LOSS, 3: LOW_LOSS}, keys)
    assert stats["count"] == 4 and stats["unscored"] == 2 and stats["mean"] == pytest.approx(15 / 4)


def test_the_two_sides_never_overlap_near_a_share_sum_of_one():
    keys = list(range(7))
    pruned = select_pruned(keys, [float(k) for k in keys], drop_highest=0.5, drop_lowest=0.49)  # 3.5 and 3.43
    assert pruned == {4: HIGH_LOSS, 5: HIGH_LOSS, 6: HIGH_LOSS, 0: LOW_LOSS, 1: LOW_LOSS, 2: LOW_LOSS}


def test_summary_of_the_score_distribution():
    keys = list(range(1000))
    losses = np.random.default_rng(1).normal(3.0, 0.5, 1000)
    pruned = select_pruned(keys, losses, drop_highest=0.1, drop_lowest=0.05)
    stats = summary(losses, pruned, keys)
    assert stats["count"] == 1000 and stats["unscored"] == 0
    assert stats["mean"] == pytest.approx(losses.mean()) and stats["std"] == pytest.approx(losses.std())
    assert stats["min"] == losses.min() and stats["max"] == losses.max()
    q = stats["quantiles"]
    assert list(q) == ["p01", "p05", "p10", "p25", "p50", "p75", "p90", "p95", "p99"]
    assert list(q.values()) == sorted(q.values()) and q["p50"] == pytest.approx(np.median(losses))
    hist = stats["histogram"]
    assert len(hist["counts"]) == HISTOGRAM_BINS and len(hist["edges"]) == HISTOGRAM_BINS + 1
    assert sum(hist["counts"]) == 1000 and hist["edges"][0] == losses.min() and hist["edges"][-1] == losses.max()
    high = sorted(losses)[-100]
    low = sorted(losses)[49]
    assert stats["high_threshold"] == high and stats["low_threshold"] == low
    assert all(losses[k] >= high for k, r in pruned.items() if r == HIGH_LOSS)
    assert all(losses[k] <= low for k, r in pruned.items() if r == LOW_LOSS)
    off = summary(losses, {}, keys)
    assert off["high_threshold"] is None and off["low_threshold"] is None


def test_pruning_reasons_are_policy_drops():
    assert set(PRUNE_REASONS) <= POLICY_DROPS  # counted, never raised with data.on_error=raise


def test_scores_key_names_the_model_and_the_data():
    key = scores_key(identity=[["model.safetensors", 10, 1]], data_fingerprint="abc")
    assert key == scores_key(identity=[["model.safetensors", 10, 1]], data_fingerprint="abc")
    assert key != scores_key(identity=[["model.safetensors", 10, 2]], data_fingerprint="abc")
    assert key != scores_key(identity=[["model.safetensors", 10, 1]], data_fingerprint="abd")


def _chats(n: int) -> list[dict]:
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Add {i} and {i}."}, {"role": "assistant", "content": str(2 * i)}]
        if i % 4 == 0:
            messages += [{"role": "user", "content": "Double it."}, {"role": "assistant", "content": str(4 * i)}]
        out.append({"messages": messages, "task": "add"})
    return out


def test_corrupt_answers_shuffles_a_share_of_answers_across_questions():
    chats = _chats(200)
    before = [dict(c, messages=[dict(m) for m in c["messages"]]) for c in chats]
    corrupted, changed = corrupt_answers(chats, share=0.1, seed=3)
    assert chats == before  # the input is left as it was
    assert len(changed) == 20 and changed == sorted(changed)  # every answer here is distinct: all 20 changed
    for i, (old, new) in enumerate(zip(chats, corrupted)):
        users = [m for m in new["messages"] if m["role"] == "user"]
        assert users == [m for m in old["messages"] if m["role"] == "user"]  # questions stay
        answers = [m["content"] for m in new["messages"] if m["role"] == "assistant"]
        truth = [m["content"] for m in old["messages"] if m["role"] == "assistant"]
        assert (i in changed) == (answers != truth)
        assert len(answers) == len(truth) and new["task"] == old["task"]
        if i in changed:
            assert all(a != t for a, t in zip(answers, truth))  # no answer keeps its own question
    pool = sorted(m["content"] for i in changed for m in chats[i]["messages"] if m["role"] == "assistant")
    assert sorted(m["content"] for i in changed for m in corrupted[i]["messages"] if m["role"] == "assistant") == pool
    assert corrupt_answers(chats, share=0.1, seed=3) == (corrupted, changed)
    assert corrupt_answers(chats, share=0.1, seed=4)[1] != changed
    assert corrupt_answers(chats, share=0.0, seed=3) == (chats, [])
    with pytest.raises(ValueError, match=r"share must be in \[0, 1\), got 1.0"):
        corrupt_answers(chats, share=1.0, seed=0)
