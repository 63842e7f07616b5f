"""The Ray Data preprocessing pipeline: sources -> encoded examples -> token-ratio mix -> packed Parquet + report.

The public entry (``prepare``) and the Ray Data DAG; each stage's logic lives in the module named for it: the read
plan (``read_plan``), the encoder task (``encoder``), curation on the driver (``curation_step``), pruning
(``prune_step``), split and pack planning (``split_plan``) and the prepared-data cache (``prepared``). Bad rows
travel as data (a ``reason`` and a message naming file and line) instead of exceptions inside Ray tasks, so
``on_error=raise`` fails with one clear message and ``drop`` counts every row it skips. Determinism does not rest on
Ray's block layout: every example carries a seeded stable key, the driver cuts the key space into pack groups, and
each group is packed on its own (``groupby().map_groups``).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from sftray.config import Config
from sftray.data import curation_step, pruning
from sftray.data import report as report_mod
from sftray.data.chat import template_hash
from sftray.data.drops import check_drops, write_drops
from sftray.data.encoder import EncoderArgs, encode_pieces
from sftray.data.fingerprint import fingerprint as data_fingerprint
from sftray.data.fingerprint import with_pruning
from sftray.data.prepared import (
    DROPS_FILE,
    TOKENIZER_DIR,
    Prepared,
    is_prepared,
    load_prepared,
    write_report,
    writing,
)
from sftray.data.prune_step import Prune, prune_step
from sftray.data.read_plan import pieces
from sftray.data.schema import EXAMPLE_COLUMNS, META_COLUMNS
from sftray.data.sources import ResolvedSource, resolve_source
from sftray.data.split_plan import MixPlan, SplitPlan, pack_group, plan_mix, plan_splits, tag_splits
from sftray.data.tokenizer_view import TokenizerSpec, spec_of
from sftray.layout import prepared_dir

__all__ = ["Prepared", "load_prepared", "prepare"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class _Sources:
    """A prep's resolved inputs, by role."""

    sft: list[ResolvedSource]
    val: list[ResolvedSource]
    text: list[ResolvedSource]
    heldout: list[ResolvedSource]

    @property
    def all(self) -> list[ResolvedSource]:
        """Every source in encoding order (its index is the source's number in the read plan)."""
        return self.sft + self.val + self.text + self.heldout

    @property
    def splits(self) -> list[str]:
        """The split each source of ``all`` encodes into."""
        return ["train"] * len(self.sft) + ["val"] * len(self.val) + ["pretrain"] * (len(self.text) + len(self.heldout))


def prepare(cfg: Config, *, tokenizer: Any, force: bool = False, scoring: pruning.Scoring | None = None) -> Prepared:
    """Runs the pipeline for ``cfg`` with ``tokenizer`` (Ray must be initialised) unless an identical dataset
    exists already. ``sftray.recipes.prep`` loads the tokenizer of ``cfg.model`` (and with ``data.prune`` on, the
    ``scoring`` of its scoring model) and calls this."""
    sources = _resolve(cfg)
    fingerprint = data_fingerprint(cfg, tokenizer, sources.all)
    prune = None
    if cfg.data.prune.enabled:
        if scoring is None:
            raise ValueError("data.prune is on but no scoring model was given: prepare through sftray.recipes.prep")
        # The scores' key: the fingerprint without the prune config, so another share reuses them.
        prune = Prune(scoring=scoring, key=pruning.scores_key(identity=scoring.identity, data_fingerprint=fingerprint))
        fingerprint = with_pruning(fingerprint, prune=cfg.data.prune, scores_key=prune.key)
    out_dir = prepared_dir(cfg.paths.output_dir, name=cfg.data.name, fingerprint=fingerprint)
    if is_prepared(out_dir) and not force:
        log.info("prepared data is up to date: %s", out_dir)
        return load_prepared(out_dir)

    with writing(out_dir) as tmp, _data_context():
        tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        report = _run(cfg, spec=spec_of(tokenizer), sources=sources, out=tmp, prune=prune)
        report.update(
            fingerprint=fingerprint,
            chat_template_hash=template_hash(tokenizer),
            tokenizer=cfg.model.name_or_path,
            out_dir=str(out_dir),
        )
        write_report(tmp, report)
    return Prepared(out_dir=out_dir, report=report)


def _resolve(cfg: Config) -> _Sources:
    cache_dir = Path(cfg.paths.cache_dir)

    def each(key: str, configs: list[Any], *, text: bool = False) -> list[ResolvedSource]:
        return [resolve_source(s, cache_dir=cache_dir, what=f"{key}[{i}]", text=text) for i, s in enumerate(configs)]

    return _Sources(
        sft=each("data.sources", cfg.data.sources),
        val=each("data.val_sources", cfg.data.val_sources),
        text=each("mix.sources", cfg.mix.sources, text=True),
        heldout=each("mix.heldout_sources", cfg.mix.heldout_sources, text=True),
    )


@contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data settings of one prep, restored afterwards (the context is the driver process's)."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.shuffle_strategy, ctx.op_resource_reservation_enabled)
    ctx.execution_options.preserve_order = True
    # The pull-based sort shuffle runs as plain tasks; the default hash shuffle starts aggregator actors on every
    # run, a fixed cost that dominates a small prep.
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    # Without per-operator reservations the encoder gets every CPU at once. With them (Ray's default) it starts
    # with half of them and gets the rest only after its first task reports, so the other CPUs idle for a task.
    ctx.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.shuffle_strategy, ctx.op_resource_reservation_enabled = saved


# --- the run -------------------------------------------------------------------------------------------------


def _run(cfg: Config, *, spec: TokenizerSpec, sources: _Sources, out: Path, prune: Prune | None) -> dict[str, Any]:
    """Encodes, curates, (prunes,) mixes, packs and writes the splits into ``out``; returns the report."""
    import ray

    data = cfg.data
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # 1. Every source read and encoded by Ray Data tasks, materialised once (the mix needs every length first).
    encoded = _encode(cfg, spec=spec, sources=sources, cpus=cpus)
    everything = _meta(encoded, extra=["dedup"] if data.dedup != "none" else [])
    is_text = everything["split"] == "pretrain"
    meta, wmeta = everything[~is_text].reset_index(drop=True), everything[is_text].reset_index(drop=True)

    # 2. Curation on the driver, where only keys travel: duplicates (train copies of validation rows and probes
    #    included), then each source's weight / max_rows as copies per example (0: unused, 2: seen twice).
    if data.dedup != "none":
        curation_step.drop_duplicates(meta, probe_keys=curation_step.probe_keys(cfg), probes=data.probes)
    meta["copies"] = curation_step.source_copies(meta, sft=sources.sft, configs=data.sources)
    drops = check_drops(meta, on_error=data.on_error, what="conversation")
    drops.update(check_drops(wmeta, on_error=data.on_error, what="pretraining record"))

    # 2b. Loss-based pruning (data.prune): the training conversations that curation kept, scored by the scoring
    #     model in an actor pool (or read from the score cache), the extremes marked as policy drops.
    prune_report = None
    if prune is not None:
        prune_report = prune_step(encoded, meta, cfg=cfg, prune=prune, cpus=cpus)
        pruned = meta[meta["reason"].isin(pruning.PRUNE_REASONS)]
        drops.update(check_drops(pruned, on_error=data.on_error, what="conversation"))  # counted and logged

    # 3. Exact token-ratio selection of training windows, then every split's examples and pack groups (driver
    #    side: only keys and lengths travel).
    ok = meta["reason"] == ""
    train_meta = meta[ok & (meta["split"] == "train") & (meta["copies"] > 0)]
    val_meta = meta[ok & (meta["split"] == "val")]
    if train_meta.empty:
        raise ValueError(f"no training examples left ({dict(drops)} dropped); see the errors above")
    mix = plan_mix(train_meta, wmeta[wmeta["reason"] == ""], mix=cfg.mix, seed=cfg.seed)
    plan, keys = plan_splits(meta, train_meta, val_meta, mix=mix, group_size=data.pack_group_size, seed=cfg.seed)

    # 4. Tag, shuffle once, pack and write Parquet per split.
    _pack_and_write(
        encoded.select_columns(EXAMPLE_COLUMNS + ["reason", "split"]), plan=plan, cfg=cfg, out=out, cpus=cpus
    )
    write_drops(out / DROPS_FILE, meta, wmeta)
    return _report(
        cfg, sources=sources, meta=meta, wmeta=wmeta, drops=drops, keys=keys, mix=mix, out=out, prune=prune_report
    )


def _encode(cfg: Config, *, spec: TokenizerSpec, sources: _Sources, cpus: int) -> Any:
    """Every source, cut into pieces -> one Ray Data task per piece reads it and encodes it: conversations into
    masked examples (or a drop reason), pretraining text into windows. One pass; nothing but the pieces' addresses
    goes in. Tasks, not an actor pool: the tokenizer view is cheap to build once per worker process, and an actor
    pool's start and teardown cost more than that."""
    import ray
    import ray.data

    data, everything = cfg.data, sources.all
    read = pieces(everything, sources.splits, cpus=cpus)
    encoders = min(len(read), data.num_encoders or max(1, round(cpus / max(data.cpus_per_encoder, 1.0))))
    encoder = ray.put(
        EncoderArgs(
            spec=spec,
            sources=everything,
            data=data,
            window_len=cfg.window_len,
            heldout_fraction=cfg.mix.heldout_fraction,
            heldout_sources=tuple(range(len(everything) - len(sources.heldout), len(everything))),
            seed=cfg.seed,
            hash_split=not sources.val,
        )
    )
    return (
        ray.data.from_items(read, override_num_blocks=len(read))
        .map_batches(
            encode_pieces,
            fn_kwargs={"encoder": encoder},
            compute=ray.data.TaskPoolStrategy(size=encoders),
            num_cpus=data.cpus_per_encoder,
            batch_size=1,  # one piece per task: a piece is already a few thousand records
            batch_format="pyarrow",
        )
        .materialize()
    )


def _meta(ds: Any, *, extra: list[str] = ()) -> Any:
    """The metadata columns of the encoded set, block order kept, as pandas on the driver (no tokens travel)."""
    return ds.select_columns([*META_COLUMNS, *extra]).to_pandas()


def _pack_and_write(ds: Any, *, plan: SplitPlan, cfg: Config, out: Path, cpus: int) -> None:
    """Tags every example with its split and seeded key-range pack group, groups by (split, pack group) in ONE
    shuffle, packs each group and writes ``out/<split>/*.parquet``. No row is filtered out before the shuffle: a
    block that a filter empties loses its schema, and Ray's hash shuffle then fails ("Schema at index N was
    different")."""
    data = cfg.data
    num_groups = sum(len(b) + 1 for b in plan.bounds.values())
    # The tagging tasks take a whole CPU each, like the encoder's, so they run in the encoders' worker processes:
    # at a fraction of a CPU Ray starts extra workers for them, and each one first imports every module.
    tagged = ds.map_batches(tag_splits, fn_kwargs={"plan": plan}, batch_format="pyarrow")
    rows_dir = out / "_rows"
    # One shuffle partition per CPU, each packing several groups: Ray's default of 200 (or one per group) costs
    # task overhead and buys no parallelism.
    partitions = min(num_groups, cpus)
    tagged.groupby(["split", "group"], num_partitions=partitions).map_groups(
        pack_group,
        fn_kwargs={"max_seq_len": data.max_seq_len, "packing": data.packing, "seed": cfg.seed},
        batch_format="pyarrow",
    ).write_parquet(str(rows_dir), partition_cols=["split"])
    for name in plan.bounds:
        written = rows_dir / f"split={name}"
        if written.is_dir():
            written.rename(out / name)
        else:
            (out / name).mkdir(parents=True)  # a split with no rows (e.g. no held-out window) stays readable
    shutil.rmtree(rows_dir, ignore_errors=True)


def _report(
    cfg: Config,
    *,
    sources: _Sources,
    meta: Any,
    wmeta: Any,
    drops: Any,
    keys: dict[str, list[int]],
    mix: MixPlan,
    out: Path,
    prune: dict[str, Any] | None,
) -> dict[str, Any]:
    stats = {
        name: _split_stats(out / name, examples=len(k), max_seq_len=cfg.data.max_seq_len) for name, k in keys.items()
    }
    return report_mod.build(
        cfg=cfg,
        sources=sources.all,
        meta=meta,
        wmeta=wmeta,
        drops=drops,
        stats=stats,
        target_pretrain_tokens=mix.target,
        windows_per_pass=[len(p) for p in mix.passes],
        prune=prune,
    )


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
