"""The Ray Data preprocessing pipeline: sources -> encoded examples -> token-ratio mix -> packed Parquet + report.

The only module that calls Ray Data. Bad rows travel as data (a ``reason`` and a message naming file and line)
instead of exceptions inside Ray tasks, so ``on_error=raise`` fails with one clear message and ``drop`` counts
every row it skips. Determinism does not rest on Ray's block layout: every example carries a seeded stable key,
the driver cuts the key space into pack groups, and each group is packed on its own (``groupby().map_groups``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from sftray.config import Config, DataConfig
from sftray.data import report as report_mod
from sftray.data.chat import template_hash
from sftray.data.errors import DataError
from sftray.data.mixing import chunk_windows, in_fraction, pretrain_token_target, select_windows, stable_key
from sftray.data.packing import KIND_PRETRAIN, KIND_SFT, pack_examples, pad_examples
from sftray.data.sources import (
    ResolvedSource,
    fingerprint_files,
    iter_file_records,
    load_hub_split,
    record_text,
    resolve_source,
)

log = logging.getLogger(__name__)

DATA_VERSION = 1
"""Bumped whenever the stored row schema or any transform changes; part of the fingerprint."""
POLICY_DROPS = frozenset({"too_long"})
"""Drop reasons decided by policy (data.overlength), not by malformed input: counted, never raised."""

_RAW = pa.schema(
    [
        ("where", pa.string()),
        ("source", pa.string()),
        ("record", pa.string()),
        ("reason", pa.string()),
        ("error", pa.string()),
        ("split", pa.string()),
        ("fmt", pa.string()),
        ("text_field", pa.string()),
    ]
)
_EXAMPLE_COLUMNS = ["input_ids", "labels", "kind", "key"]
ROW_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),
        ("seq_lens", pa.list_(pa.int32())),
        ("seq_kinds", pa.list_(pa.int8())),
        ("num_tokens", pa.int32()),
        ("num_trained", pa.int32()),
        ("num_pretrain_tokens", pa.int32()),
    ]
)
"""Schema of a stored training row (train, val and pretrain_heldout alike)."""
_META_COLUMNS = ["where", "source", "split", "reason", "error", "truncated", "n_tokens", "n_trained", "key", "heldout"]


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


def prepare(cfg: Config, *, force: bool = False) -> Prepared:
    """Runs the pipeline for ``cfg`` (Ray must be initialised) unless an identical dataset exists already."""
    import ray.data

    from sftray.models.loading import load_tokenizer

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    cache_dir = Path(cfg.paths.cache_dir)
    tokenizer = load_tokenizer(cfg.model, cache_dir=cache_dir)
    sft = [resolve_source(s, cache_dir=cache_dir, what=f"data.sources[{i}]") for i, s in enumerate(cfg.data.sources)]
    val = [
        resolve_source(s, cache_dir=cache_dir, what=f"data.val_sources[{i}]")
        for i, s in enumerate(cfg.data.val_sources)
    ]
    text = [
        resolve_source(s, cache_dir=cache_dir, what=f"mix.sources[{i}]", text=True)
        for i, s in enumerate(cfg.mix.sources)
    ]

    fingerprint = _fingerprint(cfg, tokenizer, sft + val + text)
    out_dir = Path(cfg.paths.output_dir) / "data" / f"{cfg.data.name}-{fingerprint[:12]}"
    if (out_dir / "report.json").is_file() and not force:
        log.info("prepared data is up to date: %s", out_dir)
        return load_prepared(out_dir)

    tmp = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
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
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
    drops = _check_drops(meta, on_error=data.on_error, what="conversation")

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
    drops.update(_check_drops(wmeta, on_error=data.on_error, what="pretraining record"))
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
    heldout_keys = set(heldout_meta["key"].astype("uint64").tolist())

    examples = encoded.select_columns(_EXAMPLE_COLUMNS + ["reason", "split"])
    train_ex = examples.map_batches(_keep, fn_kwargs={"split": "train"}, batch_format="pyarrow")
    if takes:  # a union with an empty (schema-less) dataset fails in Arrow
        train_ex = train_ex.union(
            windows.select_columns(_EXAMPLE_COLUMNS + ["reason", "split"]).map_batches(
                _take_windows, fn_kwargs={"takes": takes}, batch_format="pyarrow"
            )
        )
    val_ex = examples.map_batches(_keep, fn_kwargs={"split": "val"}, batch_format="pyarrow")
    heldout_ex = windows.select_columns(_EXAMPLE_COLUMNS).map_batches(
        _keep_keys, fn_kwargs={"keys": heldout_keys}, batch_format="pyarrow"
    )

    # 4. Pack (or pad) each split in seeded key-range groups, then write Parquet.
    train_keys = sorted(train_meta["key"].tolist() + list(takes))
    splits = {
        "train": (train_ex, train_keys),
        "val": (val_ex, sorted(val_meta["key"].tolist())),
        "pretrain_heldout": (heldout_ex, sorted(heldout_keys)),
    }
    stats: dict[str, dict] = {}
    for name, (ds, keys) in splits.items():
        stats[name] = _pack_and_write(ds, keys=keys, data=data, seed=cfg.seed, path=out / name)

    _write_drops(out / "drops.jsonl", meta, wmeta)
    return report_mod.build(
        cfg=cfg,
        sources=sft + val + text,
        meta=meta,
        wmeta=wmeta,
        drops=drops,
        stats=stats,
        target_pretrain_tokens=target,
    )


def _pack_and_write(ds: Any, *, keys: list[int], data: DataConfig, seed: int, path: Path) -> dict[str, int]:
    """Groups examples by key range (``pack_group_size`` per group), packs each group, writes Parquet."""
    path.mkdir(parents=True, exist_ok=True)
    if not keys:
        return {"examples": 0, "rows": 0, "tokens": 0, "trained_tokens": 0, "pretrain_tokens": 0, "slots": 0}
    bounds = np.asarray(keys[:: data.pack_group_size][1:], dtype=np.uint64)
    num_groups = len(bounds) + 1
    grouped = ds.map_batches(_assign_group, fn_kwargs={"bounds": bounds}, batch_format="pyarrow")
    # One shuffle partition per group (capped): Ray's default of 200 costs seconds of task overhead here.
    grouped.groupby("group", num_partitions=min(num_groups, 64)).map_groups(
        _pack_group,
        fn_kwargs={"max_seq_len": data.max_seq_len, "packing": data.packing, "seed": seed},
        batch_format="pyarrow",
    ).write_parquet(str(path))
    import pyarrow.parquet as pq

    counts = pq.read_table(path, columns=["num_tokens", "num_trained", "num_pretrain_tokens"])
    rows = counts.num_rows
    total = {name: int(counts[name].to_numpy().sum()) for name in counts.column_names}
    return {
        "examples": len(keys),
        "rows": rows,
        "tokens": total["num_tokens"],
        "trained_tokens": total["num_trained"],
        "pretrain_tokens": total["num_pretrain_tokens"],
        "slots": rows * data.max_seq_len,
    }


# --- reading --------------------------------------------------------------------------------------------------


def _read_all(sources: list[tuple[ResolvedSource, str]]) -> Any:
    import ray.data

    parts = []
    for src, split in sources:
        if src.kind == "hub":
            hf = load_hub_split(src)
            table = pa.table(
                {
                    "where": [f"{src.paths[0]}[{src.split}] row {i + 1}" for i in range(len(hf))],
                    "source": [src.label] * len(hf),
                    "record": [json.dumps(r, default=str) for r in hf],
                    "reason": [""] * len(hf),
                    "error": [""] * len(hf),
                    "split": [split] * len(hf),
                    "fmt": [src.fmt] * len(hf),
                    "text_field": [src.text_field] * len(hf),
                },
                schema=_RAW,
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
    out: dict[str, list] = {name: [] for name in _RAW.names}
    for path, data in zip(batch["path"].to_pylist(), batch["bytes"].to_pylist()):
        for row, record in iter_file_records(path, data):
            bad = isinstance(record, DataError)
            out["where"].append(f"{path}:{row}")
            out["source"].append(src.label)
            out["record"].append("" if bad else json.dumps(record, default=str))
            out["reason"].append(record.reason if bad else "")
            out["error"].append(str(record) if bad else "")
            out["split"].append(split)
            out["fmt"].append(src.fmt)
            out["text_field"].append(src.text_field)
    return pa.table(out, schema=_RAW)


# --- actors (one tokenizer each) ------------------------------------------------------------------------------


class _Encoder:
    def __init__(self, *, tokenizer_dir: str, data: DataConfig, seed: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.data, self.seed = data, seed

    @staticmethod
    def _table(rows: list[dict]) -> pa.Table:
        cols = {k: [r[k] for r in rows] for k in _EXAMPLE_COLUMNS + _META_COLUMNS}
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
        row["n_trained"] = sum(1 for x in row["labels"] if x != -100)
        return row


def encode_record(r: dict[str, Any], tokenizer: Any, *, data: DataConfig) -> dict[str, Any]:
    """One raw record (``where``, ``record`` JSON, ``fmt``, upstream ``reason``/``error``) -> encoded fields.

    Returns ``input_ids``/``labels``/``truncated`` for a good record, or ``reason``/``error`` for a bad one
    (never raises for bad data). Long examples are dropped or truncated per ``data.overlength``.
    """
    from sftray.data.chat import encode_chat
    from sftray.data.formats import to_messages

    if r.get("reason"):
        return {"reason": r["reason"], "error": r["error"]}
    where = r["where"]
    try:
        messages = to_messages(json.loads(r["record"]), r["fmt"], system_prompt=data.system_prompt, where=where)
        enc = encode_chat(messages, tokenizer, train_on=data.train_on, example_id=where)
        if len(enc["input_ids"]) <= data.max_seq_len:
            return {**enc, "truncated": False}
        if data.overlength == "drop":
            n = len(enc["input_ids"])
            raise DataError(f"{where}: {n} tokens > data.max_seq_len={data.max_seq_len}", reason="too_long")
        enc = encode_chat(messages, tokenizer, train_on=data.train_on, example_id=where, max_length=data.max_seq_len)
        return {**enc, "truncated": True}
    except DataError as exc:
        return {"reason": exc.reason, "error": str(exc)}


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
    return ds.select_columns(_META_COLUMNS).to_pandas()


def _keep(batch: pa.Table, *, split: str) -> pa.Table:
    import pyarrow.compute as pc

    mask = pc.and_(pc.equal(batch["reason"], ""), pc.equal(batch["split"], split))
    return batch.filter(mask).select(_EXAMPLE_COLUMNS)


def _keep_keys(batch: pa.Table, *, keys: set[int]) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch["key"], value_set=pa.array(sorted(keys), type=pa.uint64())))


def _take_windows(batch: pa.Table, *, takes: dict[int, int]) -> pa.Table:
    """Training windows picked by the mix, the last one cut to the exact remainder."""
    rows = []
    for r in batch.to_pylist():
        n = takes.get(r["key"])
        if n and r["reason"] == "" and r["split"] == "pretrain":
            rows.append(
                {"input_ids": r["input_ids"][:n], "labels": r["labels"][:n], "kind": r["kind"], "key": r["key"]}
            )
    return _examples_table(rows)


def _examples_table(rows: list[dict]) -> pa.Table:
    return pa.table(
        {
            "input_ids": pa.array([r["input_ids"] for r in rows], type=pa.list_(pa.int32())),
            "labels": pa.array([r["labels"] for r in rows], type=pa.list_(pa.int32())),
            "kind": pa.array([r["kind"] for r in rows], type=pa.int8()),
            "key": pa.array([r["key"] for r in rows], type=pa.uint64()),
        }
    )


def _assign_group(batch: pa.Table, *, bounds: np.ndarray) -> pa.Table:
    keys = batch["key"].to_numpy()
    return batch.append_column("group", pa.array(np.searchsorted(bounds, keys, side="right"), type=pa.int64()))


def _pack_group(batch: pa.Table, *, max_seq_len: int, packing: bool, seed: int) -> pa.Table:
    examples = sorted(batch.to_pylist(), key=lambda r: r["key"])  # arrival order must not matter
    group = examples[0]["group"] if examples else 0
    rows = pack_examples(examples, max_seq_len=max_seq_len, seed=seed + group) if packing else pad_examples(examples)
    return pa.table(
        {
            "input_ids": [r["input_ids"] for r in rows],
            "labels": [r["labels"] for r in rows],
            "position_ids": [r["position_ids"] for r in rows],
            "seq_lens": [r["seq_lens"] for r in rows],
            "seq_kinds": [r["seq_kinds"] for r in rows],
            "num_tokens": [len(r["input_ids"]) for r in rows],
            "num_trained": [sum(1 for x in r["labels"] if x != -100) for r in rows],
            "num_pretrain_tokens": [
                sum(n for n, k in zip(r["seq_lens"], r["seq_kinds"]) if k == KIND_PRETRAIN) for r in rows
            ],
        },
        schema=ROW_SCHEMA,
    )


# --- drops, fingerprint -----------------------------------------------------------------------------------------


def _check_drops(meta: Any, *, on_error: str, what: str) -> Counter:
    """Counts drops by reason; with ``on_error=raise`` the first malformed row (by location) raises."""
    bad = meta[meta["reason"] != ""]
    errors = bad[~bad["reason"].isin(POLICY_DROPS)]
    if on_error == "raise" and not errors.empty:
        first = errors.sort_values("where").iloc[0]
        more = f" ({len(errors) - 1} more bad {what}s)" if len(errors) > 1 else ""
        raise DataError(
            f"{first['error']}{more}. Fix the data or set data.on_error=drop to skip and count them.",
            reason=first["reason"],
        )
    counts = Counter(bad["reason"].tolist())
    for reason, group in bad.groupby("reason"):
        log.warning("dropped %d %s(s): %s; first: %s", len(group), what, reason, group["error"].iloc[0])
    return counts


def _write_drops(path: Path, *metas: Any) -> None:
    with path.open("w") as fh:
        for meta in metas:
            for r in meta[meta["reason"] != ""].itertuples():
                fh.write(json.dumps({"where": r.where, "reason": r.reason, "error": r.error}) + "\n")


def _fingerprint(cfg: Config, tokenizer: Any, sources: list[ResolvedSource]) -> str:
    """Hash of everything the output depends on: inputs' bytes, tokenizer, template, transforms' knobs, seed."""
    data = dataclasses.asdict(cfg.data)
    for runtime_only in ("num_actors", "cpus_per_actor"):
        data.pop(runtime_only)
    parts: dict[str, Any] = {
        "version": DATA_VERSION,
        "seed": cfg.seed,
        "data": data,
        "mix": dataclasses.asdict(cfg.mix),
        "window_len": cfg.window_len,
        "template": template_hash(tokenizer),
        "vocab": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
        if getattr(tokenizer, "is_fast", False)
        else tokenizer.name_or_path,
        "special": [tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token],
        "sources": [],
    }
    for src in sources:
        if src.kind == "hub":
            parts["sources"].append([src.paths[0], src.subset, src.split, load_hub_split(src)._fingerprint])
        else:
            parts["sources"].append([src.fmt, src.text_field, [f[1:] for f in fingerprint_files(src.paths)]])
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return str(obj)
