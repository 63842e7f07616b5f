"""The Ray Data preprocessing pipeline: sources -> encoded examples -> token-ratio mix -> packed Parquet + report.

The only module that calls Ray Data. Bad rows travel as data (a ``reason`` and a message naming file and line)
instead of exceptions inside Ray tasks, so ``on_error=raise`` fails with one clear message and ``drop`` counts
every row it skips. Determinism does not rest on Ray's block layout: every example carries a seeded stable key,
the driver cuts the key space into pack groups, and each group is packed on its own (``groupby().map_groups``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sftray.atomic import atomic_dir, atomic_file
from sftray.config import Config, DataConfig, PruneConfig
from sftray.data import curation, pruning
from sftray.data import report as report_mod
from sftray.data.chat import IGNORE_INDEX, template_hash
from sftray.data.drops import check_drops, write_drops
from sftray.data.encoding import encode_conversation
from sftray.data.errors import DataError
from sftray.data.fingerprint import fingerprint as data_fingerprint
from sftray.data.fingerprint import with_pruning
from sftray.data.mixing import chunk_windows, in_fraction, pretrain_token_target, repeat_windows, stable_key
from sftray.data.packing import KIND_PRETRAIN, KIND_SFT, int32_lists, pack_table
from sftray.data.probe_file import probes_path, read_probes
from sftray.data.schema import EXAMPLE_COLUMNS, META_COLUMNS, ROW_SCHEMA
from sftray.data.sources import (
    ResolvedSource,
    canonical_record,
    iter_source_records,
    line_chunks,
    load_hub_split,
    read_piece,
    record_text,
    resolve_source,
)
from sftray.data.tokenizer_view import TokenizerSpec, TokenizerView, spec_of

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """Where a prepared dataset lives and what its report says."""

    out_dir: Path
    report: dict[str, Any]

    @property
    def train_dir(self) -> Path:
        return self.out_dir / "train"

    @property
    def val_dir(self) -> Path:
        return self.out_dir / "val"

    @property
    def heldout_dir(self) -> Path:
        """Held-out pretraining windows: the forgetting measure."""
        return self.out_dir / "pretrain_heldout"

    @property
    def tokenizer_dir(self) -> Path:
        return self.out_dir / "tokenizer"


def load_prepared(out_dir: Path) -> Prepared:
    """A prepared dataset folder written earlier by ``prepare``."""
    report = Path(out_dir) / "report.json"
    if not report.is_file():
        raise FileNotFoundError(f"{out_dir} is not a prepared dataset (no report.json); run sftray prep")
    return Prepared(out_dir=Path(out_dir), report=json.loads(report.read_text()))


def prepare(cfg: Config, *, tokenizer: Any, force: bool = False, scoring: pruning.Scoring | None = None) -> Prepared:
    """Runs the pipeline for ``cfg`` with ``tokenizer`` (Ray must be initialised) unless an identical dataset
    exists already. ``sftray.recipes.prep`` loads the tokenizer of ``cfg.model`` (and with ``data.prune`` on, the
    ``scoring`` of its scoring model) and calls this."""
    cache_dir = Path(cfg.paths.cache_dir)
    sft = [resolve_source(s, cache_dir=cache_dir, what=f"data.sources[{i}]") for i, s in enumerate(cfg.data.sources)]
    val = [
        resolve_source(s, cache_dir=cache_dir, what=f"data.val_sources[{i}]")
        for i, s in enumerate(cfg.data.val_sources)
    ]
    text = [
        resolve_source(s, cache_dir=cache_dir, what=f"mix.sources[{i}]", text=True)
        for i, s in enumerate(cfg.mix.sources)
    ]
    heldout = [
        resolve_source(s, cache_dir=cache_dir, what=f"mix.heldout_sources[{i}]", text=True)
        for i, s in enumerate(cfg.mix.heldout_sources)
    ]

    fingerprint = data_fingerprint(cfg, tokenizer, sft + val + text + heldout)
    prune = None
    if cfg.data.prune.enabled:
        if scoring is None:
            raise ValueError("data.prune is on but no scoring model was given: prepare through sftray.recipes.prep")
        # The scores' key: the fingerprint without the prune config, so another share reuses them.
        prune = _Prune(scoring=scoring, key=pruning.scores_key(identity=scoring.identity, data_fingerprint=fingerprint))
        fingerprint = with_pruning(fingerprint, prune=cfg.data.prune, scores_key=prune.key)
    out_dir = Path(cfg.paths.output_dir) / "data" / f"{cfg.data.name}-{fingerprint[:12]}"
    if (out_dir / "report.json").is_file() and not force:
        log.info("prepared data is up to date: %s", out_dir)
        return load_prepared(out_dir)

    with atomic_dir(out_dir, replace=True) as tmp, _data_context():  # a crash never leaves a prepared-looking folder
        tokenizer.save_pretrained(tmp / "tokenizer")
        report = _run(cfg, spec=spec_of(tokenizer), sft=sft, val=val, text=text, heldout=heldout, out=tmp, prune=prune)
        report.update(
            fingerprint=fingerprint,
            chat_template_hash=template_hash(tokenizer),
            tokenizer=cfg.model.name_or_path,
            out_dir=str(out_dir),
        )
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    return Prepared(out_dir=out_dir, report=report)


@contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data settings of one prep, restored afterwards (the context is the driver process's)."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.shuffle_strategy, ctx.op_resource_reservation_enabled)
    ctx.execution_options.preserve_order = True
    # The pull-based sort shuffle runs as plain tasks. The default hash shuffle starts aggregator actors on every
    # run, about 3 s of a 200-conversation prep on 2 CPUs (bench: prep_fixed_cost_s).
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    # Without per-operator reservations the encoder gets every CPU at once. With them (Ray's default) it starts
    # with half of them and gets the rest after its first task reports: the second of 2 CPUs idled for a whole
    # task (about 1.5 s of 9 s at 100k conversations).
    ctx.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.shuffle_strategy, ctx.op_resource_reservation_enabled = saved


# --- the run -------------------------------------------------------------------------------------------------


def _run(
    cfg: Config,
    *,
    spec: TokenizerSpec,
    sft: list[ResolvedSource],
    val: list[ResolvedSource],
    text: list[ResolvedSource],
    heldout: list[ResolvedSource],
    out: Path,
    prune: _Prune | None,
) -> dict[str, Any]:
    import ray
    import ray.data

    data, mix = cfg.data, cfg.mix

    # 1. Every source, cut into pieces -> one Ray Data task per piece reads it and encodes it: conversations into
    #    masked examples (or a drop reason), pretraining text into windows. One pass, nothing but the pieces'
    #    addresses goes in, and the encoded set is materialised once (the mix needs every length first). Tasks,
    #    not an actor pool: the tokenizer view costs ~10 ms to build, and an actor pool's start and teardown cost
    #    whole seconds (100k conversations, 1 core: 16 s as tasks, 20 s as actors).
    sources = sft + val + text + heldout
    splits = ["train"] * len(sft) + ["val"] * len(val) + ["pretrain"] * (len(text) + len(heldout))
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    pieces = _pieces(sources, splits, cpus=cpus)
    encoders = min(len(pieces), data.num_encoders or max(1, round(cpus / max(data.cpus_per_encoder, 1.0))))
    encoder = ray.put(
        _EncoderArgs(
            spec=spec,
            sources=sources,
            data=data,
            window_len=cfg.window_len,
            heldout_fraction=mix.heldout_fraction,
            heldout_sources=tuple(range(len(sources) - len(heldout), len(sources))),
            seed=cfg.seed,
            hash_split=not val,
        )
    )
    encoded = (
        ray.data.from_items(pieces, override_num_blocks=len(pieces))
        .map_batches(
            _encode_pieces,
            fn_kwargs={"encoder": encoder},
            compute=ray.data.TaskPoolStrategy(size=encoders),
            num_cpus=data.cpus_per_encoder,
            batch_size=1,  # one piece per task: a piece is already a few thousand records
            batch_format="pyarrow",
        )
        .materialize()
    )
    everything = _meta(encoded, extra=["dedup"] if data.dedup != "none" else [])
    is_text = everything["split"] == "pretrain"
    meta, wmeta = everything[~is_text].reset_index(drop=True), everything[is_text].reset_index(drop=True)

    # 2. Curation on the driver, where only keys travel: duplicates (train copies of validation rows and probes
    #    included), then each source's weight / max_rows as copies per example (0: unused, 2: seen twice).
    if data.dedup != "none":
        _drop_duplicates(meta, probe_keys=_probe_keys(cfg), probes=data.probes)
    meta["copies"] = _source_copies(meta, sft=sft, configs=data.sources)
    drops = check_drops(meta, on_error=data.on_error, what="conversation")
    drops.update(check_drops(wmeta, on_error=data.on_error, what="pretraining record"))
    wok = wmeta[wmeta["reason"] == ""]

    # 2b. Loss-based pruning (data.prune): the training conversations that curation kept, scored by the scoring
    #     model in an actor pool (or read from the score cache), the extremes marked as policy drops.
    prune_report = None
    if prune is not None:
        prune_report = _prune(encoded, meta, cfg=cfg, prune=prune, cpus=cpus)
        pruned = meta[meta["reason"].isin(pruning.PRUNE_REASONS)]
        drops.update(check_drops(pruned, on_error=data.on_error, what="conversation"))  # counted and logged

    # 3. Exact token-ratio selection of training windows (driver side: only keys and lengths travel); a corpus
    #    smaller than the target goes in again, up to mix.max_repeats passes, each later use a copy under its own key.
    ok = meta["reason"] == ""
    train_meta = meta[ok & (meta["split"] == "train") & (meta["copies"] > 0)]
    val_meta = meta[ok & (meta["split"] == "val")]
    if train_meta.empty:
        raise ValueError(f"no training examples left ({dict(drops)} dropped); see the errors above")
    sft_tokens = int((train_meta["n_tokens"] * train_meta["copies"]).sum())
    target = pretrain_token_target(sft_tokens, ratio=mix.ratio)
    pool_meta = wok[~wok["heldout"]]
    pool_keys = [int(k) for k in pool_meta["key"]]
    passes = repeat_windows(
        pool_meta["n_tokens"].tolist(), pool_keys, target_tokens=target, max_repeats=mix.max_repeats, seed=cfg.seed
    )
    takes = {pool_keys[i]: n for i, n in passes[0]} if passes else {}
    repeats = [
        (pool_keys[i], stable_key("mix-repeat", pool_keys[i], p, seed=cfg.seed), n)
        for p, picked in enumerate(passes[1:], start=1)
        for i, n in picked
    ]
    heldout_meta = wok[wok["heldout"]].nsmallest(mix.max_heldout_windows, "key")
    heldout_keys = sorted(heldout_meta["key"].astype("uint64").tolist())

    # 4. Tag every example with its split and seeded key-range pack group, pack each (split, group) after ONE
    #    shuffle, and write Parquet partitioned by split. No row is filtered out before the shuffle: a block that a
    #    filter empties loses its schema, and Ray's hash shuffle then fails ("Schema at index N was different").
    repeated = train_meta[train_meta["copies"] > 1]
    copies = sorted(
        [
            (int(k), stable_key("copy", int(k), c, seed=cfg.seed), WHOLE)
            for k, n in zip(repeated["key"], repeated["copies"])
            for c in range(1, int(n))
        ]
        + repeats
    )
    unused = meta[(meta["reason"] != "") | ((meta["split"] == "train") & (meta["copies"] == 0))]
    keys = {
        "train": sorted(train_meta["key"].tolist() + [c for _, c, _ in copies] + list(takes)),
        "val": sorted(val_meta["key"].tolist()),
        "pretrain_heldout": heldout_keys,
    }
    plan = _SplitPlan(
        bounds={name: _group_bounds(k, data.pack_group_size) for name, k in keys.items()},
        take_keys=np.asarray(sorted(takes), dtype=np.uint64),
        take_lens=np.asarray([takes[k] for k in sorted(takes)], dtype=np.int64),
        heldout_keys=np.asarray(heldout_keys, dtype=np.uint64),
        unused_keys=np.sort(unused["key"].to_numpy(dtype=np.uint64)),
        copy_of=np.asarray([k for k, _, _ in copies], dtype=np.uint64),
        copy_keys=np.asarray([c for _, c, _ in copies], dtype=np.uint64),
        copy_lens=np.asarray([n for _, _, n in copies], dtype=np.int64),
    )
    _pack_and_write(
        encoded.select_columns(EXAMPLE_COLUMNS + ["reason", "split"]),
        plan=plan,
        data=data,
        seed=cfg.seed,
        out=out,
        cpus=cpus,
    )
    stats = {name: _split_stats(out / name, examples=len(k), max_seq_len=data.max_seq_len) for name, k in keys.items()}

    write_drops(out / "drops.jsonl", meta, wmeta)
    return report_mod.build(
        cfg=cfg,
        sources=sources,
        meta=meta,
        wmeta=wmeta,
        drops=drops,
        stats=stats,
        target_pretrain_tokens=target,
        windows_per_pass=[len(p) for p in passes],
        prune=prune_report,
    )


@dataclass(frozen=True, kw_only=True)
class _SplitPlan:
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


WHOLE = np.iinfo(np.int64).max
"""A copy's length when it takes the whole example."""


def _group_bounds(keys: list[int], group_size: int) -> np.ndarray:
    return np.asarray(keys[::group_size][1:], dtype=np.uint64)


def _drop_duplicates(meta: Any, *, probe_keys: list[list[int]], probes: str | None) -> None:
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


def _probe_keys(cfg: Config) -> list[list[int]]:
    """Duplicate keys of the generation probes (each probe's conversation and its reference as one exchange)."""
    if not cfg.data.probes:
        return []
    path = probes_path(cfg.data.probes, cache_dir=cfg.paths.cache_dir)
    records = read_probes(path, columns=cfg.data.probe_columns, system_prompt=cfg.data.system_prompt)
    return [dedup_keys(r.exchange(), data=cfg.data, seed=cfg.seed) for r in records if r.reference is not None]


def _source_copies(meta: Any, *, sft: list[ResolvedSource], configs: list[Any]) -> np.ndarray:
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


@dataclass(frozen=True, kw_only=True)
class _Prune:
    """A prep's pruning: the recipe's scorer and the key its scores are cached under."""

    scoring: pruning.Scoring
    key: str


PRUNE_SCORES_DIR = "prune_scores"
"""Folder of cached scores under ``paths.cache_dir``: ``<key>.parquet`` of ``pruning.SCORE_COLUMNS``."""


def _prune(encoded: Any, meta: Any, *, cfg: Config, prune: _Prune, cpus: int) -> dict[str, Any]:
    """Scores the training conversations in use (no drop reason, copies > 0), or reads their cached scores, and
    marks the ones ``data.prune`` drops in ``meta`` (in place) with their reason; returns the report's section."""
    import pyarrow.parquet as pq

    conf = cfg.data.prune
    used = ((meta["reason"] == "") & (meta["split"] == "train") & (meta["copies"] > 0)).to_numpy()
    rows = np.flatnonzero(used)
    keys = meta["key"].to_numpy(dtype=np.uint64)[rows]
    path = Path(cfg.paths.cache_dir) / PRUNE_SCORES_DIR / f"{prune.key}.parquet"
    scores = _cached_scores(path, keys)
    from_cache = scores is not None
    if scores is None:
        log.info("scoring %d training conversations with %s (data.prune)", len(keys), prune.scoring.model)
        scores = _score(encoded, keys, scoring=prune.scoring, conf=conf, cpus=cpus)
        with atomic_file(path) as tmp:
            pq.write_table(scores, tmp)
    else:
        log.info("scores of %d training conversations read from %s (data.prune)", len(keys), path)
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


def _pack_and_write(ds: Any, *, plan: _SplitPlan, data: DataConfig, seed: int, out: Path, cpus: int) -> None:
    """Tags, groups by (split, pack group), packs each group and writes ``out/<split>/*.parquet``."""
    num_groups = sum(len(b) + 1 for b in plan.bounds.values())
    # A whole CPU per tagging task, like the encoder's, so the tasks run in the encoders' worker processes. At half
    # a CPU, Ray started extra workers for them, and each one first imported the modules: 2.2 s of a 9 s prep of
    # 100k conversations on 2 CPUs, where the tagging itself takes 0.2 s.
    tagged = ds.map_batches(_tag_splits, fn_kwargs={"plan": plan}, batch_format="pyarrow")
    rows_dir = out / "_rows"
    # One shuffle partition per CPU, each packing several groups: Ray's default of 200 (or one per group, or four
    # per CPU: 13.0 s vs 12.0 s above) costs task overhead and buys no parallelism.
    partitions = min(num_groups, cpus)
    tagged.groupby(["split", "group"], num_partitions=partitions).map_groups(
        _pack_group,
        fn_kwargs={"max_seq_len": data.max_seq_len, "packing": data.packing, "seed": seed},
        batch_format="pyarrow",
    ).write_parquet(str(rows_dir), partition_cols=["split"])
    for name in plan.bounds:
        written = rows_dir / f"split={name}"
        if written.is_dir():
            written.rename(out / name)
        else:
            (out / name).mkdir(parents=True)  # a split with no rows (e.g. no held-out window) stays readable
    shutil.rmtree(rows_dir, ignore_errors=True)


def _split_stats(path: Path, *, examples: int, max_seq_len: int) -> dict[str, int]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet"))
    columns = ["num_tokens", "num_trained", "num_pretrain_tokens"]
    counts = pa.concat_tables([pq.read_table(f, columns=columns) for f in files]) if files else None
    rows = counts.num_rows if counts is not None else 0
    total = {c: int(counts[c].to_numpy().sum()) if counts is not None else 0 for c in columns}
    return {
        "examples": examples,
        "rows": rows,
        "tokens": total["num_tokens"],
        "trained_tokens": total["num_trained"],
        "pretrain_tokens": total["num_pretrain_tokens"],
        "slots": rows * max_seq_len,
    }


# --- reading ---------------------------------------------------------------------------------------------------

PIECES_PER_CPU = 2
"""Pieces per CPU of the cluster: two, so no CPU idles long while another finishes a piece, and few, because Ray
Data leaves ~0.15 s between one task's end and the next one's start (100k conversations, fresh Ray, 1 vs 2 CPUs:
13.7 s / 7.3 s with 2 per CPU, 13.6 s / 7.9 s with 4)."""
ROWS_PER_CHUNK = 1000
"""Encoded rows an encoder holds as Python objects before it turns them into Arrow. Building a whole piece's rows
first made every record slower as the piece grew (cache misses, the garbage collector walking every live row): one
core, 100k conversations in 4 pieces, 15-16 s of encoding as one list against 11.2-12.5 s in chunks of 1000."""
PIECE_BYTES = (1 << 18, 1 << 24)
"""Bounds on a JSONL piece's size (256 KiB .. 16 MiB): small files stay whole, big ones spread over every CPU."""


def _pieces(sources: list[ResolvedSource], splits: list[str], *, cpus: int) -> list[dict[str, Any]]:
    """The read plan: each source cut into pieces (JSONL by line ranges, hub splits by row ranges, other files
    whole) of a size that gives every CPU a few; the output does not depend on the cut (keys come from file:line)."""
    files = [(p, Path(p).stat().st_size) for s in sources if s.kind == "files" for p in s.paths]
    total = sum(size for _, size in files)
    target = int(min(max(total / (cpus * PIECES_PER_CPU), PIECE_BYTES[0]), PIECE_BYTES[1]))
    pieces = []
    for index, (src, split) in enumerate(zip(sources, splits)):
        base = {"source": index, "split": split, "path": "", "offset": 0, "length": 0, "first_line": 1, "whole": True}
        if src.kind == "hub":
            n = len(load_hub_split(src))
            step = max(1, -(-n // (cpus * PIECES_PER_CPU)))
            pieces += [{**base, "offset": lo, "length": min(step, n - lo)} for lo in range(0, n, step)]
            continue
        for path in src.paths:
            cut = line_chunks(path, target_bytes=target)
            pieces += [
                {**base, "path": path, "offset": o, "length": n, "first_line": line, "whole": len(cut) == 1}
                for o, n, line in cut
            ]
    return pieces


# --- the encoder (one tokenizer view per worker process) -------------------------------------------------------


class _Encoder:
    """Reads pieces of the sources and encodes every record in them.

    Conversations -> checked, masked examples with their seeded key and split (``encode_conversation``);
    pretraining text -> tokens + eos -> windows of ``window_len``, each trained on every token. A bad record is a
    row with its ``reason`` and a message naming file and line.
    """

    def __init__(
        self,
        *,
        spec: TokenizerSpec,
        sources: list[ResolvedSource],
        data: DataConfig,
        window_len: int,
        heldout_fraction: float,
        heldout_sources: tuple[int, ...],
        seed: int,
        hash_split: bool,
    ) -> None:
        self.tokenizer = TokenizerView(spec)
        self.eos_id = spec.eos_token_id
        self.sources, self.data, self.seed, self.hash_split = sources, data, seed, hash_split
        self.window_len, self.heldout_fraction, self.heldout_sources = window_len, heldout_fraction, heldout_sources
        self._hub: dict[str, Any] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict[str, Any]] = []
        tables = []
        for piece in batch.to_pylist():
            src = self.sources[piece["source"]]
            for where, fmt, record in self._records(src, piece):
                if piece["split"] == "pretrain":
                    rows.extend(self._windows(where, src, record, held_out=self._held_out(piece["source"])))
                else:
                    rows.append(self._chat(where, src, piece["split"], fmt, record))
                if len(rows) >= ROWS_PER_CHUNK:
                    tables.append(_table(rows))
                    rows = []
        tables.append(_table(rows))
        return pa.concat_tables(tables)

    def _records(self, src: ResolvedSource, piece: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
        if src.kind == "hub":
            if src.label not in self._hub:
                self._hub[src.label] = load_hub_split(src)
            hf = self._hub[src.label]
            for i in range(piece["offset"], piece["offset"] + piece["length"]):
                where = f"{src.paths[0]}[{src.split}] row {i + 1}"
                yield where, src.fmt, canonical_record(src, hf[i], fmt=src.fmt, where=where)
            return
        path = piece["path"]
        data = read_piece(path, piece["offset"], piece["length"])
        for row, fmt, record in iter_source_records(
            src, path, data, first_line=piece["first_line"], whole=piece["whole"]
        ):
            yield f"{path}:{row}", fmt, record

    def _chat(self, where: str, src: ResolvedSource, split: str, fmt: str, record: Any) -> dict[str, Any]:
        key = stable_key(where, seed=self.seed)
        if (
            split == "train"
            and self.hash_split
            and in_fraction(stable_key("val", key, seed=self.seed), self.data.val_fraction)
        ):
            split = "val"
        if isinstance(record, DataError):
            fields: dict[str, Any] = {"reason": record.reason, "error": str(record)}
        else:
            fields = encode_conversation(record, self.tokenizer, where=where, fmt=fmt, data=self.data)
            messages = fields.pop("messages", None)
            if messages is not None:
                fields = self._curate(where, messages, fields)
        return _row(where=where, source=src.label, split=split, key=key, **fields)

    def _curate(self, where: str, messages: list[dict], fields: dict[str, Any]) -> dict[str, Any]:
        """The length and shape filters (a drop reason), then the conversation's duplicate keys."""
        failed = curation.filter_reason(
            n_trained=sum(1 for x in fields["labels"] if x != IGNORE_INDEX),
            n_tokens=len(fields["input_ids"]),
            n_turns=sum(1 for m in messages if m["role"] == "assistant"),
            data=self.data,
        )
        if failed:
            return {"reason": failed[0], "error": f"{where}: {failed[1]}"}
        return {**fields, "dedup": dedup_keys(messages, data=self.data, seed=self.seed)}

    def _held_out(self, source: int) -> bool | None:
        """Whether every window of source ``source`` is held out (True), none is (False), or each by its hash (None:
        no mix.heldout_sources, so mix.sources lend heldout_fraction of their windows)."""
        if not self.heldout_sources:
            return None
        return source in self.heldout_sources

    def _windows(self, where: str, src: ResolvedSource, record: Any, *, held_out: bool | None) -> list[dict[str, Any]]:
        base = dict(where=where, source=src.label, split="pretrain", kind=KIND_PRETRAIN)
        try:
            if isinstance(record, DataError):
                raise record
            text = record_text(record, text_field=src.text_field, where=where)
        except DataError as exc:
            return [_row(**base, key=stable_key(where, seed=self.seed), reason=exc.reason, error=str(exc))]
        # verbose=False: a whole document is longer than model_max_length on purpose (it is windowed next)
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [self.eos_id]
        rows = []
        for w, window in enumerate(chunk_windows(ids, window_len=self.window_len)):
            key = stable_key(where, w, seed=self.seed)
            heldout = (
                in_fraction(stable_key("heldout", key, seed=self.seed), self.heldout_fraction)
                if held_out is None
                else held_out
            )
            rows.append(_row(**base, key=key, input_ids=window, labels=window, heldout=heldout))
        return rows


@dataclass(frozen=True, kw_only=True)
class _EncoderArgs:
    """What every encoding task needs, put in the object store once per prep."""

    spec: TokenizerSpec
    sources: list[ResolvedSource]
    data: DataConfig
    window_len: int
    heldout_fraction: float
    heldout_sources: tuple[int, ...]
    """Indices (into ``sources``) of mix.heldout_sources: all their windows are held out, no other window is."""
    seed: int
    hash_split: bool


_ENCODER: dict[Any, _Encoder] = {}
"""The worker process's encoder of the current prep (a worker runs many tasks; the view is built once)."""


def _encode_pieces(batch: pa.Table, *, encoder: Any) -> pa.Table:
    """Ray Data task: the encoded records of a batch of pieces (``encoder``: object ref of ``_EncoderArgs``)."""
    import ray

    if encoder not in _ENCODER:
        _ENCODER.clear()
        _ENCODER[encoder] = _Encoder(**vars(ray.get(encoder)))
    return _ENCODER[encoder](batch)


def dedup_keys(messages: list[dict], *, data: DataConfig, seed: int) -> list[int]:
    """The keys two duplicate conversations share (``data.dedup``): none, the exact hash, or the MinHash bands."""
    if data.dedup == "exact":
        return [curation.exact_hash(messages)]
    if data.dedup == "near":
        return curation.minhash_bands(
            curation.normalized_text(messages),
            threshold=data.near_threshold,
            num_perm=data.minhash_perm,
            shingle_words=data.shingle_words,
            seed=seed,
        )
    return []


_ENCODED_TYPES = {
    "dedup": pa.list_(pa.uint64()),
    "input_ids": pa.list_(pa.int32()),
    "labels": pa.list_(pa.int32()),
    "kind": pa.int8(),
    "key": pa.uint64(),
    "truncated": pa.bool_(),
    "heldout": pa.bool_(),
    "n_tokens": pa.int32(),
    "n_trained": pa.int32(),
}


def _table(rows: list[dict]) -> pa.Table:
    """Encoded rows as Arrow with a fixed schema (an empty piece keeps it too)."""
    return pa.table(
        {
            k: pa.array([r[k] for r in rows], type=_ENCODED_TYPES.get(k, pa.string()))
            for k in [*EXAMPLE_COLUMNS, *META_COLUMNS, "dedup"]
        }
    )


def _row(where: str, source: str, split: str, key: int, **fields: Any) -> dict[str, Any]:
    row = {
        "where": where,
        "source": source,
        "split": split,
        "key": key,
        "input_ids": [],
        "labels": [],
        "kind": KIND_SFT,
        "reason": "",
        "error": "",
        "truncated": False,
        "heldout": False,
        "dedup": [],
    }
    row.update(fields)
    row["n_tokens"] = len(row["input_ids"])
    row["n_trained"] = sum(1 for x in row["labels"] if x != IGNORE_INDEX)
    return row


# --- small batch transforms -----------------------------------------------------------------------------------


def _meta(ds: Any, *, extra: list[str] = ()) -> Any:
    """The metadata columns of the encoded set, block order kept, as pandas on the driver (no tokens travel)."""
    return ds.select_columns([*META_COLUMNS, *extra]).to_pandas()


def _tag_splits(batch: pa.Table, *, plan: _SplitPlan) -> pa.Table:
    """Each example -> the same row with its output ``split`` and pack ``group``; one row out per row in.

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
    input_ids, labels = _cut_lists(batch["input_ids"], keep), _cut_lists(batch["labels"], keep)
    # Extra copies (a source weight's, a later pass of the mix): the same tokens under their own keys, each cut to
    # its own length, appended to the block.
    first, last = np.searchsorted(plan.copy_of, keys, "left"), np.searchsorted(plan.copy_of, keys, "right")
    pairs = [(i, j) for i in np.flatnonzero((last > first) & (split == "train")) for j in range(first[i], last[i])]
    source = np.asarray([i for i, _ in pairs], dtype=np.int64)
    copy_at = np.asarray([j for _, j in pairs], dtype=np.int64)
    copy_keys = plan.copy_keys[copy_at] if pairs else np.zeros(0, dtype=np.uint64)
    copy_keep = np.minimum(lengths[source], plan.copy_lens[copy_at]) if pairs else np.zeros(0, dtype=np.int64)
    kinds = batch["kind"].to_numpy()
    return pa.table(
        {
            "input_ids": pa.concat_arrays([input_ids, _cut_lists(batch["input_ids"].take(source), copy_keep)]),
            "labels": pa.concat_arrays([labels, _cut_lists(batch["labels"].take(source), copy_keep)]),
            "kind": pa.array(np.concatenate([kinds, kinds[source]]), type=pa.int8()),
            "key": pa.array(np.concatenate([keys, copy_keys]), type=pa.uint64()),
            "split": pa.array(np.concatenate([split.astype(str), ["train"] * len(source)]), type=pa.string()),
            "group": pa.array(
                np.concatenate([group, np.searchsorted(plan.bounds["train"], copy_keys, side="right")]),
                type=pa.int64(),
            ),
        }
    )


def _cut_lists(column: Any, keep: np.ndarray) -> pa.ListArray:
    """The first ``keep[i]`` values of each list ``i`` of an int32 list column, without a Python loop per row."""
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


def _pack_group(batch: pa.Table, *, max_seq_len: int, packing: bool, seed: int) -> pa.Table:
    split = batch["split"][0].as_py() if batch.num_rows else ""
    if not split:  # the rows no split takes
        examples = batch.slice(0, 0)
    else:
        examples = batch.take(pc.sort_indices(batch, [("key", "ascending")]))  # arrival order must not matter
    group = batch["group"][0].as_py() if examples.num_rows else 0
    table = pack_table(examples, max_seq_len=max_seq_len, packing=packing, seed=seed + group).cast(ROW_SCHEMA)
    return table.append_column("split", pa.array([split] * table.num_rows, type=pa.string()))


# --- helpers ------------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return str(obj)
