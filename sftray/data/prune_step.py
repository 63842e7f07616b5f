"""Pruning inside a prep (``data.prune``): the kept training conversations scored by the recipe's scoring model in
a Ray Data actor pool (or their cached scores read), and the extremes marked as policy drops.

Which conversations go is ``sftray.data.pruning`` (pure); this module runs the scoring and keeps the score cache,
keyed by the scoring model and the unpruned data's fingerprint, so another share reuses the scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sftray.atomic import atomic_file
from sftray.config import Config, PruneConfig
from sftray.data import pruning
from sftray.data.read_plan import PIECES_PER_CPU

log = logging.getLogger(__name__)

PRUNE_SCORES_DIR = "prune_scores"
"""Folder of cached scores under ``paths.cache_dir``: ``<key>.parquet`` of ``pruning.SCORE_COLUMNS``."""


@dataclass(frozen=True, kw_only=True)
class Prune:
    """A prep's pruning: the recipe's scorer and the key its scores are cached under."""

    scoring: pruning.Scoring
    key: str


def prune_step(encoded: Any, meta: Any, *, cfg: Config, prune: Prune, cpus: int) -> dict[str, Any]:
    """Scores the training conversations in use (no drop reason, copies > 0), or reads their cached scores, and
    marks the ones ``data.prune`` drops in ``meta`` (in place) with their reason; returns the report's section."""
    conf = cfg.data.prune
    used = ((meta["reason"] == "") & (meta["split"] == "train") & (meta["copies"] > 0)).to_numpy()
    rows = np.flatnonzero(used)
    keys = meta["key"].to_numpy(dtype=np.uint64)[rows]
    scores, from_cache = _scores(encoded, keys, path=_scores_path(cfg, prune), prune=prune, conf=conf, cpus=cpus)
    by_key = dict(zip(scores["key"].to_numpy(), scores["loss"].to_numpy(zero_copy_only=False)))
    losses = np.asarray([by_key[k] for k in keys], dtype=np.float64)
    pruned = pruning.select_pruned(keys, losses, drop_highest=conf.drop_highest, drop_lowest=conf.drop_lowest)
    shares = {pruning.HIGH_LOSS: ("highest", conf.drop_highest), pruning.LOW_LOSS: ("lowest", conf.drop_lowest)}
    for i, key, loss in zip(rows, keys, losses):
        if reason := pruned.get(int(key)):
            side, share = shares[reason]
            meta.loc[i, "reason"] = reason
            meta.loc[i, "error"] = (
                f"{meta['where'].iat[i]}: mean target loss {loss:.4f} is in the {side} {share:g} under "
                f"{prune.scoring.model} (data.prune.drop_{side})"
            )
    return {
        "model": prune.scoring.model,
        "scores_key": prune.key,
        "scores_from_cache": from_cache,
        "drop_highest": conf.drop_highest,
        "drop_lowest": conf.drop_lowest,
        "scored": int(len(keys)),
        "dropped": {r: sum(1 for v in pruned.values() if v == r) for r in pruning.PRUNE_REASONS},
        "scores": pruning.summary(losses, pruned, keys),
    }


def _scores_path(cfg: Config, prune: Prune) -> Path:
    return Path(cfg.paths.cache_dir) / PRUNE_SCORES_DIR / f"{prune.key}.parquet"


def _scores(
    encoded: Any, keys: np.ndarray, *, path: Path, prune: Prune, conf: PruneConfig, cpus: int
) -> tuple[pa.Table, bool]:
    """The scores of the conversations ``keys`` and whether they came from the cache at ``path`` (else they are
    computed now and cached there)."""
    import pyarrow.parquet as pq

    scores = _cached_scores(path, keys)
    if scores is not None:
        log.info("scores of %d training conversations read from %s (data.prune)", len(keys), path)
        return scores, True
    log.info("scoring %d training conversations with %s (data.prune)", len(keys), prune.scoring.model)
    scores = _score(encoded, keys, scoring=prune.scoring, conf=conf, cpus=cpus)
    with atomic_file(path) as tmp:
        pq.write_table(scores, tmp)
    return scores, False


def _cached_scores(path: Path, keys: np.ndarray) -> pa.Table | None:
    """The cached scores at ``path`` if they cover every key, else None (absent, or written for other rows)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return None
    table = pq.read_table(path)
    return table if np.isin(keys, table["key"].to_numpy()).all() else None


def _score(encoded: Any, keys: np.ndarray, *, scoring: pruning.Scoring, conf: PruneConfig, cpus: int) -> pa.Table:
    """``pruning.SCORE_COLUMNS`` of the conversations ``keys``: batch inference in an actor pool of scorers, each
    holding the scoring model, on a GPU each when the cluster has them (``data.prune.num_gpus_per_scorer``)."""
    import ray
    import ray.data

    gpus = float(ray.cluster_resources().get("GPU", 0))
    gpus_per = conf.num_gpus_per_scorer if conf.num_gpus_per_scorer is not None else (1.0 if gpus else 0.0)
    if gpus_per:
        size = conf.num_scorers or max(1, int(gpus // gpus_per))
    else:
        size = conf.num_scorers or max(1, int(cpus // conf.cpus_per_scorer))
    # Enough blocks for every scorer to get work (map_batches never splits a block, and an encoded piece is one
    # block), and none smaller than a scoring batch. Materialised before the pool starts: scorers that hold every
    # CPU would otherwise leave none for the selecting tasks upstream, and the run hangs.
    blocks = max(1, min(size * PIECES_PER_CPU, -(-len(keys) // conf.batch_size)))
    wanted = ray.put(np.sort(keys))
    selected = (
        encoded.select_columns(["key", "input_ids", "labels"])
        .map_batches(_select_keys, fn_kwargs={"keys": wanted}, batch_format="pyarrow")
        .repartition(blocks)
        .materialize()
    )
    scores = selected.map_batches(
        scoring.actor,
        fn_constructor_kwargs=scoring.kwargs,
        compute=ray.data.ActorPoolStrategy(size=size),
        num_cpus=conf.cpus_per_scorer,
        num_gpus=gpus_per,
        batch_size=None,  # a whole block per call: the scorer batches by length itself
        batch_format="pyarrow",
    )
    table = pa.concat_tables(ray.get(scores.to_arrow_refs()))
    assert table.num_rows == len(keys), (table.num_rows, len(keys))
    return table.select(list(pruning.SCORE_COLUMNS))


def _select_keys(batch: pa.Table, *, keys: Any) -> pa.Table:
    """The rows of ``batch`` whose key is in ``keys`` (sorted; an object ref of them inside Ray)."""
    import ray

    wanted = ray.get(keys) if isinstance(keys, ray.ObjectRef) else keys
    return batch.filter(pa.array(np.isin(batch["key"].to_numpy(), wanted)))
