"""The encoder task: a Ray Data task that reads pieces of the sources and encodes every record in them.

Conversations become checked, masked examples with their seeded key, split and duplicate keys
(``encode_conversation``, then the curation filters); pretraining text becomes tokens + eos cut into windows. A bad
record is a row with its ``reason`` and a message naming file and line, never an exception inside the task. One
tokenizer view per worker process, built once for the prep and reused by every task the process runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from sftray.config import DataConfig
from sftray.data import curation
from sftray.data.chat import IGNORE_INDEX
from sftray.data.encoding import encode_conversation
from sftray.data.errors import DataError
from sftray.data.mixing import chunk_windows, in_fraction, stable_key
from sftray.data.packing import KIND_PRETRAIN, KIND_SFT
from sftray.data.schema import EXAMPLE_COLUMNS, META_COLUMNS
from sftray.data.sources import (
    ResolvedSource,
    canonical_record,
    iter_source_records,
    load_hub_split,
    read_piece,
    record_text,
)
from sftray.data.tokenizer_view import TokenizerSpec, TokenizerView

ROWS_PER_CHUNK = 1000
"""Encoded rows an encoder holds as Python objects before it turns them into Arrow. Building a whole piece's rows
first made every record slower as the piece grew (cache misses, the garbage collector walking every live row)."""
ENCODED_TYPES = {
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
"""Arrow types of the encoded set's columns (any other column is a string)."""


@dataclass(frozen=True, kw_only=True)
class EncoderArgs:
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
    """No data.val_sources: data.val_fraction of the training conversations go to val, each by its key's hash."""


class Encoder:
    """Reads pieces of the sources and encodes every record in them (one call per batch of pieces)."""

    def __init__(self, args: EncoderArgs) -> None:
        self.args = args
        self.tokenizer = TokenizerView(args.spec)
        self.eos_id = args.spec.eos_token_id
        self._hub: dict[str, Any] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict[str, Any]] = []
        tables = []
        for piece in batch.to_pylist():
            src = self.args.sources[piece["source"]]
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
        args = self.args
        key = stable_key(where, seed=args.seed)
        if (
            split == "train"
            and args.hash_split
            and in_fraction(stable_key("val", key, seed=args.seed), args.data.val_fraction)
        ):
            split = "val"
        if isinstance(record, DataError):
            fields: dict[str, Any] = {"reason": record.reason, "error": str(record)}
        else:
            fields = encode_conversation(record, self.tokenizer, where=where, fmt=fmt, data=args.data)
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
            data=self.args.data,
        )
        if failed:
            return {"reason": failed[0], "error": f"{where}: {failed[1]}"}
        return {**fields, "dedup": curation.dedup_keys(messages, data=self.args.data, seed=self.args.seed)}

    def _held_out(self, source: int) -> bool | None:
        """Whether every window of source ``source`` is held out (True), none is (False), or each by its hash (None:
        no mix.heldout_sources, so mix.sources lend heldout_fraction of their windows)."""
        if not self.args.heldout_sources:
            return None
        return source in self.args.heldout_sources

    def _windows(self, where: str, src: ResolvedSource, record: Any, *, held_out: bool | None) -> list[dict[str, Any]]:
        args = self.args
        base = dict(where=where, source=src.label, split="pretrain", kind=KIND_PRETRAIN)
        try:
            if isinstance(record, DataError):
                raise record
            text = record_text(record, text_field=src.text_field, where=where)
        except DataError as exc:
            return [_row(**base, key=stable_key(where, seed=args.seed), reason=exc.reason, error=str(exc))]
        # verbose=False: a whole document is longer than model_max_length on purpose (it is windowed next)
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [self.eos_id]
        rows = []
        for w, window in enumerate(chunk_windows(ids, window_len=args.window_len)):
            key = stable_key(where, w, seed=args.seed)
            heldout = (
                in_fraction(stable_key("heldout", key, seed=args.seed), args.heldout_fraction)
                if held_out is None
                else held_out
            )
            rows.append(_row(**base, key=key, input_ids=window, labels=window, heldout=heldout))
        return rows


_ENCODER: dict[Any, Encoder] = {}
"""The worker process's encoder of the current prep (a worker runs many tasks; the view is built once)."""


def encode_pieces(batch: pa.Table, *, encoder: Any) -> pa.Table:
    """Ray Data task: the encoded records of a batch of pieces (``encoder``: object ref of ``EncoderArgs``)."""
    import ray

    if encoder not in _ENCODER:
        _ENCODER.clear()
        _ENCODER[encoder] = Encoder(ray.get(encoder))
    return _ENCODER[encoder](batch)


def _table(rows: list[dict]) -> pa.Table:
    """Encoded rows as Arrow with a fixed schema (an empty piece keeps it too)."""
    return pa.table(
        {
            k: pa.array([r[k] for r in rows], type=ENCODED_TYPES.get(k, pa.string()))
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
