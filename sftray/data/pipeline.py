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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sftray.atomic import atomic_dir
from sftray.config import Config, DataConfig
from sftray.data import report as report_mod
from sftray.data.chat import IGNORE_INDEX, template_hash
from sftray.data.drops import check_drops, write_drops
from sftray.data.encoding import encode_record
from sftray.data.errors import DataError
from sftray.data.fingerprint import fingerprint as data_fingerprint
from sftray.data.mixing import chunk_windows, in_fraction, pretrain_token_target, select_windows, stable_key
from sftray.data.packing import KIND_PRETRAIN, KIND_SFT, pack_examples, pad_examples
from sftray.data.schema import EXAMPLE_COLUMNS, META_COLUMNS, RAW_SCHEMA, ROW_SCHEMA
from sftray.data.sources import (
    ResolvedSource,
    canonical_record,
    iter_source_records,
    load_hub_split,
    record_text,
    resolve_source,
)

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


def prepare(cfg: Config, *, tokenizer: Any, force: bool = False) -> Prepared:
    """Runs the pipeline for ``cfg`` with ``tokenizer`` (Ray must be initialised) unless an identical dataset
    exists already. ``sftray.recipes.prep`` loads the tokenizer of ``cfg.model`` and calls this."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
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

    fingerprint = data_fingerprint(cfg, tokenizer, sft + val + text)
    out_dir = Path(cfg.paths.output_dir) / "data" / f"{cfg.data.name}-{fingerprint[:12]}"
    if (out_dir / "report.json").is_file() and not force:
        log.info("prepared data is up to date: %s", out_dir)
        return load_prepared(out_dir)

    with atomic_dir(out_dir, replace=True) as tmp:  # a crash never leaves a folder that looks prepared
        tokenizer.save_pretrained(tmp / "tokenizer")
        report = _run(
            cfg, tokenizer_dir=tmp / "tokenizer", sft=sft, val=val, text=text, out=tmp, eos_id=tokenizer.eos_token_id
        )
        report.update(
            fingerprint=fingerprint,
            chat_template_hash=template_hash(tokenizer),
            tokenizer=cfg.model.name_or_path,
            out_dir=str(out_dir),
        )
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    return Prepared(out_dir=out_dir, report=report)


# --- the run -------------------------------------------------------------------------------------------------


def _run(
    cfg: Config,
    *,
    tokenizer_dir: Path,
    sft: list[ResolvedSource],
    val: list[ResolvedSource],
    text: list[ResolvedSource],
    out: Path,
    eos_id: int,
) -> dict[str, Any]:
    import ray.data

    data, mix = cfg.data, cfg.mix
    pool = dict(
        compute=ray.data.ActorPoolStrategy(size=data.num_actors),
        num_cpus=data.cpus_per_actor,
        batch_format="pyarrow",
        batch_size=256,
    )
    common = dict(tokenizer_dir=str(tokenizer_dir), data=data, seed=cfg.seed)

    # 1. Conversations -> encoded examples with their masks (or a drop reason).
    raw = _read_all([(s, "train") for s in sft] + [(s, "val") for s in val])
    encoded = raw.map_batches(
        _ChatEncoder, fn_constructor_kwargs={**common, "hash_split": not val}, **pool
    ).materialize()
    meta = _meta(encoded)
    drops = check_drops(meta, on_error=data.on_error, what="conversation")

    # 2. Pretraining text -> windows (train side and held-out side).
    windows = (
        _read_all([(s, "pretrain") for s in text])
        .map_batches(
            _TextWindower,
            fn_constructor_kwargs={
                **common,
                "window_len": cfg.window_len,
                "heldout_fraction": mix.heldout_fraction,
                "eos_id": eos_id,
            },
            **pool,
        )
        .materialize()
    )
    wmeta = _meta(windows)
    drops.update(check_drops(wmeta, on_error=data.on_error, what="pretraining record"))
    wok = wmeta[wmeta["reason"] == ""]

    # 3. Exact token-ratio selection of training windows (driver side: only keys and lengths travel).
    ok = meta["reason"] == ""
    train_meta, val_meta = meta[ok & (meta["split"] == "train")], meta[ok & (meta["split"] == "val")]
    if train_meta.empty:
        raise ValueError(f"no training examples left ({dict(drops)} dropped); see the errors above")
    target = pretrain_token_target(int(train_meta["n_tokens"].sum()), ratio=mix.ratio)
    pool_meta = wok[~wok["heldout"]]
    picked = select_windows(pool_meta["n_tokens"].tolist(), pool_meta["key"].tolist(), target_tokens=target)
    takes = {int(pool_meta["key"].iloc[i]): n for i, n in picked}
    heldout_meta = wok[wok["heldout"]].nsmallest(mix.max_heldout_windows, "key")
    heldout_keys = sorted(heldout_meta["key"].astype("uint64").tolist())

    # 4. Tag every example with its split and seeded key-range pack group, pack each (split, group) after ONE
    #    shuffle, and write Parquet partitioned by split. No row is filtered out before the shuffle: a block that a
    #    filter empties loses its schema, and Ray's hash shuffle then fails ("Schema at index N was different").
    keys = {
        "train": sorted(train_meta["key"].tolist() + list(takes)),
        "val": sorted(val_meta["key"].tolist()),
        "pretrain_heldout": heldout_keys,
    }
    plan = _SplitPlan(
        bounds={name: _group_bounds(k, data.pack_group_size) for name, k in keys.items()},
        take_keys=np.asarray(sorted(takes), dtype=np.uint64),
        take_lens=np.asarray([takes[k] for k in sorted(takes)], dtype=np.int64),
        heldout_keys=np.asarray(heldout_keys, dtype=np.uint64),
    )
    examples = encoded.select_columns(EXAMPLE_COLUMNS + ["reason", "split"])
    if not wmeta.empty:  # a union with an empty (schema-less) dataset fails in Arrow
        examples = examples.union(windows.select_columns(EXAMPLE_COLUMNS + ["reason", "split"]))
    _pack_and_write(examples, plan=plan, data=data, seed=cfg.seed, out=out)
    stats = {name: _split_stats(out / name, examples=len(k), max_seq_len=data.max_seq_len) for name, k in keys.items()}

    write_drops(out / "drops.jsonl", meta, wmeta)
    return report_mod.build(
        cfg=cfg,
        sources=sft + val + text,
        meta=meta,
        wmeta=wmeta,
        drops=drops,
        stats=stats,
        target_pretrain_tokens=target,
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


def _group_bounds(keys: list[int], group_size: int) -> np.ndarray:
    return np.asarray(keys[::group_size][1:], dtype=np.uint64)


def _pack_and_write(ds: Any, *, plan: _SplitPlan, data: DataConfig, seed: int, out: Path) -> None:
    """Tags, groups by (split, pack group), packs each group and writes ``out/<split>/*.parquet``."""
    num_groups = sum(len(b) + 1 for b in plan.bounds.values())
    tagged = ds.map_batches(_tag_splits, fn_kwargs={"plan": plan}, batch_format="pyarrow")
    rows_dir = out / "_rows"
    # One shuffle partition per group (capped): Ray's default of 200 costs seconds of task overhead here.
    tagged.groupby(["split", "group"], num_partitions=min(num_groups, 64)).map_groups(
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


# --- reading --------------------------------------------------------------------------------------------------


def _read_all(sources: list[tuple[ResolvedSource, str]]) -> Any:
    import ray.data

    parts = []
    for src, split in sources:
        if src.kind == "hub":
            hf = load_hub_split(src)
            wheres = [f"{src.paths[0]}[{src.split}] row {i + 1}" for i in range(len(hf))]
            records = [canonical_record(src, r, fmt=src.fmt, where=w) for w, r in zip(wheres, hf)]
            bad = [isinstance(r, DataError) for r in records]
            table = pa.table(
                {
                    "where": wheres,
                    "source": [src.label] * len(hf),
                    "record": ["" if b else json.dumps(r, default=str) for r, b in zip(records, bad)],
                    "reason": [r.reason if b else "" for r, b in zip(records, bad)],
                    "error": [str(r) if b else "" for r, b in zip(records, bad)],
                    "split": [split] * len(hf),
                    "fmt": [src.fmt] * len(hf),
                    "text_field": [src.text_field] * len(hf),
                },
                schema=RAW_SCHEMA,
            )
            parts.append(ray.data.from_arrow(table))
        else:
            parts.append(
                ray.data.read_binary_files(list(src.paths), include_paths=True).map_batches(
                    _parse_files, fn_kwargs={"src": src, "split": split}, batch_format="pyarrow", batch_size=1
                )
            )
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _parse_files(batch: pa.Table, *, src: ResolvedSource, split: str) -> pa.Table:
    """File bytes -> raw rows: each record renamed to its file's format's fields (``iter_source_records``)."""
    out: dict[str, list] = {name: [] for name in RAW_SCHEMA.names}
    for path, data in zip(batch["path"].to_pylist(), batch["bytes"].to_pylist()):
        for row, fmt, record in iter_source_records(src, path, data):
            bad = isinstance(record, DataError)
            out["where"].append(f"{path}:{row}")
            out["source"].append(src.label)
            out["record"].append("" if bad else json.dumps(record, default=str))
            out["reason"].append(record.reason if bad else "")
            out["error"].append(str(record) if bad else "")
            out["split"].append(split)
            out["fmt"].append(fmt)
            out["text_field"].append(src.text_field)
    return pa.table(out, schema=RAW_SCHEMA)


# --- actors (one tokenizer each) ------------------------------------------------------------------------------


class _Encoder:
    def __init__(self, *, tokenizer_dir: str, data: DataConfig, seed: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.data, self.seed = data, seed

    @staticmethod
    def _table(rows: list[dict]) -> pa.Table:
        cols = {k: [r[k] for r in rows] for k in EXAMPLE_COLUMNS + META_COLUMNS}
        types = {
            "input_ids": pa.list_(pa.int32()),
            "labels": pa.list_(pa.int32()),
            "kind": pa.int8(),
            "key": pa.uint64(),
            "truncated": pa.bool_(),
            "heldout": pa.bool_(),
            "n_tokens": pa.int32(),
            "n_trained": pa.int32(),
        }
        return pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in cols.items()})

    @staticmethod
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
        }
        row.update(fields)
        row["n_tokens"] = len(row["input_ids"])
        row["n_trained"] = sum(1 for x in row["labels"] if x != IGNORE_INDEX)
        return row


class _ChatEncoder(_Encoder):
    """Ray actor around ``encode_record``; also assigns the seeded train/val split."""

    def __init__(self, *, hash_split: bool, **kw: Any) -> None:
        super().__init__(**kw)
        self.hash_split = hash_split

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for r in batch.to_pylist():
            key = stable_key(r["where"], seed=self.seed)
            split = r["split"]
            if (
                split == "train"
                and self.hash_split
                and in_fraction(stable_key("val", key, seed=self.seed), self.data.val_fraction)
            ):
                split = "val"
            fields = encode_record(r, self.tokenizer, data=self.data)
            rows.append(self._row(where=r["where"], source=r["source"], split=split, key=key, **fields))
        return self._table(rows)


class _TextWindower(_Encoder):
    """Pretraining record -> tokens + eos -> windows of ``window_len``, each trained on every token."""

    def __init__(self, *, window_len: int, heldout_fraction: float, eos_id: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.window_len, self.heldout_fraction, self.eos_id = window_len, heldout_fraction, eos_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for r in batch.to_pylist():
            base = dict(where=r["where"], source=r["source"], split="pretrain", kind=KIND_PRETRAIN)
            if r["reason"]:
                rows.append(
                    self._row(**base, key=stable_key(r["where"], seed=self.seed), reason=r["reason"], error=r["error"])
                )
                continue
            try:
                text = record_text(json.loads(r["record"]), text_field=r["text_field"], where=r["where"])
            except DataError as exc:
                rows.append(
                    self._row(**base, key=stable_key(r["where"], seed=self.seed), reason=exc.reason, error=str(exc))
                )
                continue
            # verbose=False: a whole document is longer than model_max_length on purpose (it is windowed next)
            ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [self.eos_id]
            for w, window in enumerate(chunk_windows(ids, window_len=self.window_len)):
                key = stable_key(r["where"], w, seed=self.seed)
                heldout = in_fraction(stable_key("heldout", key, seed=self.seed), self.heldout_fraction)
                rows.append(self._row(**base, key=key, input_ids=window, labels=window, heldout=heldout))
        return self._table(rows)


# --- small batch transforms -----------------------------------------------------------------------------------


def _meta(ds: Any) -> Any:
    return ds.select_columns(META_COLUMNS).to_pandas()


def _tag_splits(batch: pa.Table, *, plan: _SplitPlan) -> pa.Table:
    """Each example -> the same row with its output ``split`` and pack ``group``; one row out per row in.

    Conversations keep the split the encoder gave them; pretraining windows go to train (cut to the tokens the mix
    takes) or to pretrain_heldout by key. A row that no split takes (a drop, an unused window) keeps its key with
    ``split=""`` and no tokens, so blocks never empty out before the shuffle.
    """
    import pyarrow.compute as pc

    keys = batch["key"].to_numpy().astype(np.uint64)
    ok = np.asarray(pc.equal(batch["reason"], "").to_numpy(zero_copy_only=False), dtype=bool)
    source_split = np.asarray(batch["split"].to_numpy(zero_copy_only=False), dtype=object)
    pretrain = source_split == "pretrain"
    take_at = np.minimum(np.searchsorted(plan.take_keys, keys), max(len(plan.take_keys) - 1, 0))
    taken = ok & pretrain & (plan.take_keys[take_at] == keys) if len(plan.take_keys) else np.zeros(len(keys), bool)
    heldout = ok & pretrain & np.isin(keys, plan.heldout_keys)
    split = np.where(ok & ~pretrain, source_split, "")
    split = np.where(taken, "train", split)
    split = np.where(heldout, "pretrain_heldout", split)
    group = np.full(len(keys), -1, dtype=np.int64)
    for name, bounds in plan.bounds.items():
        mine = split == name
        group[mine] = np.searchsorted(bounds, keys[mine], side="right")
    input_ids, labels = batch["input_ids"].to_pylist(), batch["labels"].to_pylist()
    for i in range(len(keys)):
        if not split[i]:
            input_ids[i], labels[i] = [], []
        elif taken[i]:
            n = int(plan.take_lens[take_at[i]])
            input_ids[i], labels[i] = input_ids[i][:n], labels[i][:n]
    return pa.table(
        {
            "input_ids": pa.array(input_ids, type=pa.list_(pa.int32())),
            "labels": pa.array(labels, type=pa.list_(pa.int32())),
            "kind": batch["kind"],
            "key": batch["key"],
            "split": pa.array(split.astype(str), type=pa.string()),
            "group": pa.array(group, type=pa.int64()),
        }
    )


def _pack_group(batch: pa.Table, *, max_seq_len: int, packing: bool, seed: int) -> pa.Table:
    split = batch["split"][0].as_py() if batch.num_rows else ""
    examples = sorted(batch.to_pylist(), key=lambda r: r["key"]) if split else []  # arrival order must not matter
    group = examples[0]["group"] if examples else 0
    rows = pack_examples(examples, max_seq_len=max_seq_len, seed=seed + group) if packing else pad_examples(examples)
    table = pa.table(
        {
            "input_ids": [r["input_ids"] for r in rows],
            "labels": [r["labels"] for r in rows],
            "position_ids": [r["position_ids"] for r in rows],
            "seq_lens": [r["seq_lens"] for r in rows],
            "seq_kinds": [r["seq_kinds"] for r in rows],
            "num_tokens": [len(r["input_ids"]) for r in rows],
            "num_trained": [sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows],
            "num_pretrain_tokens": [
                sum(n for n, k in zip(r["seq_lens"], r["seq_kinds"]) if k == KIND_PRETRAIN) for r in rows
            ],
        },
        schema=ROW_SCHEMA,
    )
    return table.append_column("split", pa.array([split] * table.num_rows, type=pa.string()))


# --- helpers ------------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return str(obj)
