"""Data curation (pure): duplicate keys, near-duplicate MinHash bands, length/shape filters and per-source token weights.

Every function here takes plain values (messages, texts, hash keys, token counts, arrays) and returns plain values,
so the pipeline can call it inside a Ray stage and the tests call it directly.

- Duplicates: each row gets hash keys, one for ``data.dedup=exact`` (``exact_hash``), one per LSH band for ``near``
  (``minhash_bands``); rows sharing any key are one component (``find_duplicates``), of which the first training row
  is kept, and no training row survives that shares a component with a validation row or a probe.
- Filters: ``filter_reason`` applies data.min/max_assistant_tokens, data.max_turns and data.min_assistant_ratio.
- Weights: ``select_by_weight`` turns a source's weight and max_rows into copies per example, by token count.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np

from sftray.config import DEDUP, DataConfig

__all__ = [
    "DEDUP",
    "DUPLICATE_REASONS",
    "FILTER_REASONS",
    "dedup_keys",
    "exact_hash",
    "filter_reason",
    "find_duplicates",
    "lsh_params",
    "minhash_bands",
    "normalized_text",
    "select_by_weight",
    "token_shares",
]

DUPLICATE_REASONS = ("duplicate", "duplicate_of_eval")
"""Drop reasons of ``find_duplicates``: a later copy of a training row; a training copy of a val row or a probe."""
FILTER_REASONS = ("too_few_assistant_tokens", "too_many_assistant_tokens", "too_many_turns", "low_assistant_ratio")
"""Drop reasons of ``filter_reason``, in the order the filters are checked."""

_MINHASH_SCHEME = "affine32"  # datasketch>=2.0's default, named so a change of default cannot change our bands


def _hash64(data: bytes) -> int:
    """A stable unsigned 64-bit hash (the same on every machine, Python process and NumPy byte order)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


# --- exact duplicates ---------------------------------------------------------------------------------------------


def normalized_text(messages: list[dict]) -> str:
    """``role: content`` per message, one per line, each content with whitespace runs collapsed to one space,
    stripped and case folded: the text two conversations must share to be exact duplicates."""
    return "\n".join(f"{m['role']}: {' '.join(m['content'].split()).casefold()}" for m in messages)


def exact_hash(messages: list[dict]) -> int:
    """The data.dedup=exact key of a conversation: a 64-bit hash of its ``normalized_text`` (fits numpy uint64)."""
    return _hash64(normalized_text(messages).encode())


# --- near duplicates (MinHash LSH) --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) of the LSH for Jaccard ``threshold`` with ``num_perm`` permutations: the pair that
    minimises false positive + false negative probability, equally weighted (0.8 and 128: 9 bands of 13 rows).

    Two texts of Jaccard similarity ``s`` share a band with probability ``1 - (1 - s**rows) ** bands``."""
    # datasketch's own optimiser (MinHashLSH's default parameters) is private; this is its one caller, so a
    # datasketch release that moves it breaks here only. MinHashLSH(...).b/.r is public but refuses bands < 2.
    # datasketch is imported here and in _minhash only: it pulls scipy in, which every Ray worker that imports the
    # pipeline would pay even without data.dedup=near.
    from datasketch.lsh import _optimal_param

    bands, rows = _optimal_param(threshold, num_perm, 0.5, 0.5)
    return int(bands), int(rows)


@functools.lru_cache(maxsize=16)
def _permutations(num_perm: int, seed: int) -> np.ndarray:
    # Drawing the permutations costs far more than a MinHash of a short text; they depend on (num_perm, seed) only.
    from datasketch import MinHash  # deferred: see lsh_params

    return MinHash(num_perm=num_perm, seed=seed, scheme=_MINHASH_SCHEME).permutations


def _shingles(text: str, shingle_words: int) -> set[str]:
    words = text.lower().split()
    if len(words) < shingle_words:
        return {" ".join(words)}  # too short for one shingle: the whole text is its only shingle
    return {" ".join(words[i : i + shingle_words]) for i in range(len(words) - shingle_words + 1)}


def minhash_bands(text: str, *, threshold: float, num_perm: int, shingle_words: int, seed: int) -> list[int]:
    """The data.dedup=near keys of a text: one 64-bit hash per LSH band (``lsh_params``) of the MinHash of its set of
    word shingles (``shingle_words`` lowercased words). Texts share a band hash with the LSH probability for their
    Jaccard similarity; a band's index is part of its hash, so band 1 of one text never matches band 2 of another."""
    from datasketch import MinHash  # deferred: see lsh_params

    minhash = MinHash(num_perm=num_perm, seed=seed, scheme=_MINHASH_SCHEME, permutations=_permutations(num_perm, seed))
    minhash.update_batch([s.encode() for s in _shingles(text, shingle_words)])
    values = minhash.hashvalues.astype(">u8")  # big-endian bytes: the same band hashes on every machine
    bands, rows = lsh_params(threshold, num_perm)
    return [
        _hash64(band.to_bytes(4, "big") + values[band * rows : (band + 1) * rows].tobytes()) for band in range(bands)
    ]


# --- duplicate components -----------------------------------------------------------------------------------------


def _components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The smallest row index of each row's connected component under the edges (u, v)."""
    root = np.arange(n)
    while True:
        # Hook the larger root onto the smaller, then jump pointers until every row points at a root. root[x] <= x
        # always holds, so the root a component converges to is its smallest row.
        ru, rv = root[u], root[v]
        if np.array_equal(ru, rv):
            return root
        np.minimum.at(root, np.maximum(ru, rv), np.minimum(ru, rv))
        while not np.array_equal(jumped := root[root], root):
            root = jumped


def find_duplicates(hashes: Sequence[Sequence[int]], *, splits: Sequence[str]) -> dict[int, tuple[str, int]]:
    """Rows to drop as duplicates: {row: (reason, the row it duplicates)}, rows numbered in file order.

    ``hashes[i]`` are row i's keys (one ``exact_hash``, or the ``minhash_bands``); rows sharing any key, directly or
    through other rows, form one component. A ``train`` row in a component with a val row or a probe (any other
    split) is dropped as ``duplicate_of_eval`` of the first of those; of the remaining train rows all but the first
    are dropped as ``duplicate`` of it. Rows of other splits are never dropped."""
    if len(hashes) != len(splits):
        raise ValueError(f"{len(hashes)} rows of hashes but {len(splits)} splits")
    n = len(hashes)
    if isinstance(hashes, np.ndarray) and hashes.ndim == 2:  # the same keys per row, as one array: no Python loop
        lengths = np.full(n, hashes.shape[1])
        keys = hashes.astype(np.uint64, copy=False).ravel()
    else:
        lengths = np.fromiter(map(len, hashes), dtype=np.int64, count=n)
        keys = np.fromiter((k for row in hashes for k in row), dtype=np.uint64, count=int(lengths.sum()))
    rows = np.repeat(np.arange(n), lengths)
    order = np.argsort(keys, kind="stable")
    keys, rows = keys[order], rows[order]
    repeat = keys[1:] == keys[:-1]  # entry j+1 has the key of entry j
    run = np.cumsum(np.concatenate(([True], ~repeat))) - 1  # which run of equal keys each entry is in
    run_row = rows[np.flatnonzero(np.concatenate(([True], ~repeat)))]  # a row holding each key
    u, v = rows[1:][repeat], run_row[run[1:][repeat]]
    if not len(u):
        return {}
    comp = _components(n, u, v)

    index = np.arange(n)
    is_train = np.asarray(splits, dtype=object) == "train"
    first_eval = np.full(n, n)  # per component (indexed by its root): its first non-train row, n if none
    np.minimum.at(first_eval, comp[~is_train], index[~is_train])
    first_train = np.full(n, n)
    np.minimum.at(first_train, comp[is_train], index[is_train])
    eval_of, train_of = first_eval[comp], first_train[comp]
    of_eval = is_train & (eval_of < n)
    repeated = is_train & ~of_eval & (index != train_of)
    out = {int(i): ("duplicate_of_eval", int(eval_of[i])) for i in np.flatnonzero(of_eval)}
    out.update({int(i): ("duplicate", int(train_of[i])) for i in np.flatnonzero(repeated)})
    return dict(sorted(out.items()))


# --- length / shape filters ---------------------------------------------------------------------------------------


def filter_reason(*, n_trained: int, n_tokens: int, n_turns: int, data: DataConfig) -> tuple[str, str] | None:
    """The first data.* filter a conversation fails, as (reason, message with the numbers and the knob), or None.

    ``n_trained``: its trained (assistant) tokens; ``n_tokens``: all its tokens, so prompt tokens are the
    difference; ``n_turns``: its assistant turns."""
    if n_trained < data.min_assistant_tokens:
        return FILTER_REASONS[
            0
        ], f"{n_trained} assistant tokens < data.min_assistant_tokens={data.min_assistant_tokens}"
    if data.max_assistant_tokens is not None and n_trained > data.max_assistant_tokens:
        return FILTER_REASONS[
            1
        ], f"{n_trained} assistant tokens > data.max_assistant_tokens={data.max_assistant_tokens}"
    if data.max_turns is not None and n_turns > data.max_turns:
        return FILTER_REASONS[2], f"{n_turns} assistant turns > data.max_turns={data.max_turns}"
    n_prompt = n_tokens - n_trained
    if data.min_assistant_ratio > 0 and n_prompt > 0 and n_trained / n_prompt < data.min_assistant_ratio:
        return FILTER_REASONS[3], (
            f"{n_trained} assistant / {n_prompt} prompt tokens = {n_trained / n_prompt:.3g}"
            f" < data.min_assistant_ratio={data.min_assistant_ratio:g}"
        )
    return None


# --- per-source weights -------------------------------------------------------------------------------------------


def select_by_weight(keys: np.ndarray, n_tokens: np.ndarray, *, weight: float, max_rows: int | None) -> np.ndarray:
    """Copies of each of one source's training examples (0: not used) that realise its weight in tokens.

    ``keys`` are the examples' seeded uint64 hashes: their order is the seeded order examples are taken in.
    ``max_rows`` keeps the first max_rows by key; of those (``T`` tokens) every example gets ``floor(weight)``
    copies, and one more goes to examples in key order while that brings the total nearer ``weight * T`` (a prefix:
    the example that crosses the target is taken if it overshoots less than it gains). So the achieved tokens are
    within half an example of the target, and the examples of a smaller weight are a subset of a larger one's."""
    keys, n_tokens = np.asarray(keys), np.asarray(n_tokens, dtype=np.int64)
    if keys.shape != n_tokens.shape or keys.ndim != 1:
        raise ValueError(f"keys {keys.shape} and n_tokens {n_tokens.shape} must be 1-D and of one length")
    if not weight > 0:
        raise ValueError(f"weight={weight} must be > 0")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows={max_rows} must be >= 1")
    kept = np.argsort(keys, kind="stable")[:max_rows]
    copies = np.zeros(len(keys), dtype=np.int64)
    whole = int(np.floor(weight))
    copies[kept] = whole
    total = np.cumsum(n_tokens[kept])  # tokens of the first k+1 kept examples, in key order
    remainder = (weight - whole) * (int(total[-1]) if len(total) else 0)  # tokens still to add, one copy each
    if remainder > 0:
        take = int(np.searchsorted(total, remainder, side="right"))  # the prefix that stays at or below it
        below = int(total[take - 1]) if take else 0
        if take < len(total) and total[take] - remainder < remainder - below:
            take += 1
        copies[kept[:take]] += 1
    return copies


def token_shares(tokens_by_source: dict[str, int]) -> dict[str, float]:
    """Each source's share of the tokens (all 0.0 when there are none)."""
    total = sum(tokens_by_source.values())
    return {name: (tokens / total if total else 0.0) for name, tokens in tokens_by_source.items()}


def dedup_keys(messages: list[dict], *, data: DataConfig, seed: int) -> list[int]:
    """The keys two duplicate conversations share (``data.dedup``): none, the exact hash, or the MinHash bands."""
    if data.dedup == "exact":
        return [exact_hash(messages)]
    if data.dedup == "near":
        return minhash_bands(
            normalized_text(messages),
            threshold=data.near_threshold,
            num_perm=data.minhash_perm,
            shingle_words=data.shingle_words,
            seed=seed,
        )
    return []
