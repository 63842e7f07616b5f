"""Synthetic label noise (pure): conversations whose answers no longer fit their questions, for pruning experiments.

``jobs/corrupt_data.py`` writes such a file from any messages JSONL (the builtin demo by default), and the pruning
tests measure how many of the corrupted conversations ``data.prune`` finds.
"""

from __future__ import annotations

import random


def corrupt_answers(conversations: list[dict], *, share: float, seed: int) -> tuple[list[dict], list[int]]:
    """``share`` of the conversations (a seeded sample) with their assistant answers shuffled across their questions.

    Every assistant turn of the chosen conversations goes into one pool that is permuted without a fixed point, so
    each answer lands on another question (the format stays valid, the content no longer fits). Returns the new
    conversations (the input is not changed) and the sorted indices of those that changed: an answer can land where
    an equal one stood (two sums of 7), and a conversation whose every answer did so is not counted.
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"share must be in [0, 1), got {share}")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(conversations)), round(share * len(conversations))))
    slots = [(i, j) for i in chosen for j, m in enumerate(conversations[i]["messages"]) if m["role"] == "assistant"]
    # One random cycle through every slot: slot order[k] takes the answer of slot order[k + 1], so none keeps its own.
    order = rng.sample(range(len(slots)), len(slots))
    out = [{**c, "messages": [dict(m) for m in c["messages"]]} for c in conversations]
    for k, at in enumerate(order):
        i, j = slots[at]
        src_i, src_j = slots[order[(k + 1) % len(order)]]
        out[i]["messages"][j]["content"] = conversations[src_i]["messages"][src_j]["content"]
    changed = [i for i in chosen if out[i]["messages"] != conversations[i]["messages"]]
    return out, changed
