"""Per-record encoding (pure): one raw record -> its chat tokens and checked labels, or the reason it is dropped."""

from __future__ import annotations

import json
from typing import Any

from sftray.config import DataConfig
from sftray.data.chat import encode_chat
from sftray.data.errors import DataError
from sftray.data.formats import to_messages


def encode_record(r: dict[str, Any], tokenizer: Any, *, data: DataConfig) -> dict[str, Any]:
    """One raw record (``where``, ``record`` JSON, ``fmt``, upstream ``reason``/``error``) -> encoded fields.

    Returns ``input_ids``/``labels``/``truncated`` for a good record, or ``reason``/``error`` for a bad one
    (never raises for bad data). Long examples are dropped or truncated per ``data.overlength``.
    """
    if r.get("reason"):
        return {"reason": r["reason"], "error": r["error"]}
    out = encode_conversation(json.loads(r["record"]), tokenizer, where=r["where"], fmt=r["fmt"], data=data)
    out.pop("messages", None)
    return out


def encode_conversation(record: Any, tokenizer: Any, *, where: str, fmt: str, data: DataConfig) -> dict[str, Any]:
    """``encode_record`` of a parsed record; a good one also returns its ``messages`` (curation hashes them).

    Never raises for bad data: a bad record returns ``reason``/``error``.
    """
    try:
        messages = to_messages(record, fmt, system_prompt=data.system_prompt, where=where)
        enc = encode_chat(messages, tokenizer, train_on=data.train_on, example_id=where)
        if len(enc["input_ids"]) <= data.max_seq_len:
            return {**enc, "truncated": False, "messages": messages}
        if data.overlength == "drop":
            n = len(enc["input_ids"])
            raise DataError(f"{where}: {n} tokens > data.max_seq_len={data.max_seq_len}", reason="too_long")
        enc = encode_chat(messages, tokenizer, train_on=data.train_on, example_id=where, max_length=data.max_seq_len)
        return {**enc, "truncated": True, "messages": messages}
    except DataError as exc:
        return {"reason": exc.reason, "error": str(exc)}
