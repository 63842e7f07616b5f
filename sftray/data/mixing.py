"""Token-ratio mixing of pretraining text into SFT data, and the stable hashes behind every split (pure).

``mix.ratio`` is a share of TOKENS, not of examples: with ``S`` SFT tokens the mix adds exactly
``P = round(ratio / (1 - ratio) * S)`` pretraining tokens, so that ``P / (S + P) == ratio`` up to one token.
Windows are taken in a seeded hash order and the last one is cut to the exact remainder; a corpus smaller than
the target is reused in whole passes, each in its own seeded order, up to ``mix.max_repeats`` of them. Ray's
``Dataset.mix`` mixes rows by weight (alpha; its guide warns against weights more than ~5x apart, a 90/10 mix is
beyond that), which is why this is ours.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

_KEY_SPACE = 2**64


def stable_key(*parts: object, seed: int) -> int:
    """A 64-bit hash of ``parts`` under ``seed``: the same on every machine and Python process."""
    text = "\x1f".join(map(str, (seed, *parts)))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def in_fraction(key: int, fraction: float) -> bool:
    """True for about ``fraction`` of uniformly distributed keys (the held-out side of a split)."""
    return key < fraction * _KEY_SPACE


def chunk_windows(ids: Sequence[int], *, window_len: int) -> list[list[int]]:
    """Cuts one document's tokens into consecutive windows of ``window_len`` (the last may be shorter)."""
    return [list(ids[i : i + window_len]) for i in range(0, len(ids), window_len)]


def pretrain_token_target(sft_tokens: int, *, ratio: float) -> int:
    """Pretraining tokens to add to ``sft_tokens`` so they make up ``ratio`` of the total."""
    if not 0 <= ratio < 1:
        raise ValueError(f"mix ratio {ratio} must be in [0, 1)")
    return round(ratio / (1 - ratio) * sft_tokens)


def select_windows(lengths: Sequence[int], keys: Sequence[int], *, target_tokens: int) -> list[tuple[int, int]]:
    """Picks windows in ascending ``keys`` order until ``target_tokens`` is reached exactly (one pass).

    Returns ``(window index, tokens to take)`` pairs; only the last pair may take fewer than the window holds.
    Raises ``ValueError`` when the windows hold fewer tokens than the target (add text or lower the ratio).
    """
    available = sum(lengths)
    if target_tokens > available:
        raise corpus_too_small(available, target_tokens, max_repeats=1)
    picked: list[tuple[int, int]] = []
    remaining = target_tokens
    for i in sorted(range(len(lengths)), key=lambda j: (keys[j], j)):
        if remaining <= 0:
            break
        take = min(lengths[i], remaining)
        picked.append((i, take))
        remaining -= take
    return picked


def repeat_windows(
    lengths: Sequence[int], keys: Sequence[int], *, target_tokens: int, max_repeats: int, seed: int
) -> list[list[tuple[int, int]]]:
    """``select_windows`` over up to ``max_repeats`` passes of the corpus: one list of picks per pass.

    Pass 0 is ``select_windows`` itself (in ``keys`` order). When the target exceeds the corpus, every pass but
    the last takes every window whole, and each later pass goes through the windows in its own seeded order, so
    the cut that ends the mix falls on a different window than a plain repeat would. Raises ``ValueError`` naming
    ``mix.max_repeats`` when more passes are needed than it allows.
    """
    available = sum(lengths)
    if target_tokens <= 0:
        return []
    passes = -(-target_tokens // available) if available else None
    if passes is None or passes > max_repeats:
        raise corpus_too_small(available, target_tokens, max_repeats=max_repeats)
    out, remaining = [], target_tokens
    for p in range(passes):
        order = keys if p == 0 else [stable_key("repeat", k, p, seed=seed) for k in keys]
        picked = select_windows(lengths, order, target_tokens=min(remaining, available))
        out.append(picked)
        remaining -= sum(n for _, n in picked)
    return out


def corpus_too_small(available: int, target_tokens: int, *, max_repeats: int) -> ValueError:
    """The error of a pretraining corpus that cannot supply the mix, with every way forward."""
    if not available:
        return ValueError(
            f"the pretraining corpus has 0 trainable tokens but the mix needs {target_tokens}: add pretraining text "
            "to mix.sources or set mix.ratio=0"
        )
    passes = -(-target_tokens // available)
    return ValueError(
        f"the pretraining corpus has {available} trainable tokens but the mix needs {target_tokens} ({passes} passes "
        f"over it; mix.max_repeats={max_repeats} allows {max_repeats}): add pretraining text, lower mix.ratio or set "
        f"mix.max_repeats={passes}"
    )
