"""Curation on the driver, where only keys travel: duplicate drops (training copies of validation rows and of the
generation probes included) and each source's weight / max_rows as copies per example.

Both act on the encoded set's metadata table (pandas, one row per conversation); the pure rules are
``sftray.data.curation``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sftray.config import Config
from sftray.data import curation
from sftray.data.probe_file import probe_records
from sftray.data.sources import ResolvedSource


def drop_duplicates(meta: Any, *, probe_keys: list[list[int]], probes: str | None) -> None:
    """Marks duplicate training conversations in ``meta`` (in place) with their reason and the row they repeat:
    the first by file order stays; a training copy of a validation row or a probe always goes."""
    live = np.flatnonzero(((meta["reason"] == "") & meta["split"].isin(["train", "val"])).to_numpy())
    hashes = [list(meta["dedup"].iat[i]) for i in live] + probe_keys
    splits = meta["split"].to_numpy()[live].tolist() + ["probe"] * len(probe_keys)
    for j, (reason, first) in curation.find_duplicates(hashes, splits=splits).items():
        i = live[j]
        of = meta["where"].iat[live[first]] if first < len(live) else f"probe {first - len(live) + 1} of {probes}"
        meta.loc[i, "reason"] = reason
        meta.loc[i, "error"] = f"{meta['where'].iat[i]}: duplicates {of} (data.dedup)"


def probe_keys(cfg: Config) -> list[list[int]]:
    """Duplicate keys of the generation probes (each probe's conversation and its reference as one exchange)."""
    records = probe_records(cfg.data, cache_dir=cfg.paths.cache_dir)
    return [curation.dedup_keys(r.exchange(), data=cfg.data, seed=cfg.seed) for r in records if r.reference is not None]


def source_copies(meta: Any, *, sft: list[ResolvedSource], configs: list[Any]) -> np.ndarray:
    """Copies of every conversation in training (``curation.select_by_weight`` per weighted source; 1 elsewhere)."""
    copies = np.ones(len(meta), dtype=np.int64)
    train = ((meta["reason"] == "") & (meta["split"] == "train")).to_numpy()
    for src, conf in zip(sft, configs):
        if conf.weight == 1.0 and conf.max_rows is None:
            continue
        rows = np.flatnonzero(train & (meta["source"] == src.label).to_numpy())
        copies[rows] = curation.select_by_weight(
            meta["key"].to_numpy(dtype=np.uint64)[rows],
            meta["n_tokens"].to_numpy()[rows],
            weight=conf.weight,
            max_rows=conf.max_rows,
        )
    return copies
