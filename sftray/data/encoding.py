"""Per-record encoding (pure): one raw record -> its chat tokens and checked labels, or the reason it is dropped."""

from __future__ import annotations

from typing import Any

from sftray.config import DataConfig
from sftray.data.chat import encode_chat
from sftray.data.errors import DataError
from sftray.data.formats import to_messages


def encode_conversation(record: Any, tokenizer: Any, *, where: str, fmt: str, data: DataConfig) -> dict[str, Any]:
    """One parsed record of format ``fmt`` (``where``: its file and line) -> encoded fields.

    Returns ``input_ids``/``labels``/``truncated`` and the ``messages`` (curation hashes them) for a good record,
    or ``reason``/``error`` for a bad one (never raises for bad data). Long examples are dropped or truncated per
    ``data.overlength``.
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
