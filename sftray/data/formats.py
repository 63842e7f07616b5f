"""Conversation formats: OpenAI messages, ShareGPT, Alpaca and prompt/completion records -> one messages list.

Pure functions. Each format is recognised by its keys (``detect_format``) and converted by ``to_messages``;
a record that does not fit raises ``FormatError`` saying which keys were expected and which were found.
A source whose records use other names (``columns``, ``roles``) is first renamed by ``rename_fields``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sftray.config import SourceConfig
from sftray.data.errors import FormatError, MessageError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""ShareGPT ``from`` values and the role each becomes."""

LIST_FORMATS = ("messages", "sharegpt")
"""Formats whose record holds a list of turns under its first field; their other fields are a turn's keys."""
OPTIONAL_KEYS = {"alpaca": ("input",)}
"""Fields a record of the format may lack (alpaca's input)."""
TURN_KEYS = {fmt: SourceConfig.FIELDS[fmt][1:] for fmt in LIST_FORMATS}
"""Keys of one turn of the formats whose records hold a list of turns (under their first ``FORMAT_KEYS`` key)."""
ALL_TURN_KEYS = frozenset(k for keys in TURN_KEYS.values() for k in keys)
"""Every format's turn keys: a ``columns`` entry for one of them renames inside the turns, not at the top level."""
FORMAT_KEYS = {
    fmt: tuple(f for f in fields if f not in TURN_KEYS.get(fmt, ()) and f not in OPTIONAL_KEYS.get(fmt, ()))
    for fmt, fields in SourceConfig.FIELDS.items()
}
"""Keys that identify each format (its required top-level fields, from ``SourceConfig.FIELDS``, the one table of
the formats' fields); ``detect_format`` tries them in this order."""


def detect_format(record: dict[str, Any], *, where: str = "record") -> str:
    """The first format whose identifying keys are all present in ``record``."""
    for fmt, keys in FORMAT_KEYS.items():
        if all(k in record for k in keys):
            return fmt
    known = "; ".join(f"{fmt}: {', '.join(keys)}" for fmt, keys in FORMAT_KEYS.items())
    raise FormatError(
        f"{where}: cannot detect the format from keys {sorted(record)}; expected one of ({known})",
        reason="unknown_format",
    )


def rename_fields(
    record: Any,
    fmt: str,
    *,
    columns: Mapping[str, str],
    roles: Mapping[str, str] | None = None,
    where: str = "record",
) -> Any:
    """``record`` with a source's own names made ``fmt``'s: ``columns`` maps a field of ``fmt`` to the record's key
    (turn keys included), ``roles`` a role value to system/user/assistant. Unchanged without either.

    Raises ``FormatError`` (``missing_column``) naming the keys the record has when a mapped key of a field
    ``to_messages`` needs is absent; optional fields (alpaca's input) may be absent.
    """
    if not (columns or roles) or not isinstance(record, dict):
        return record  # to_messages reports a non-object
    turn_keys = TURN_KEYS.get(fmt, ())
    out = _rename(record, {k: v for k, v in columns.items() if k not in turn_keys}, FORMAT_KEYS[fmt], where=where)
    turn_columns = {k: v for k, v in columns.items() if k in turn_keys}
    list_key = FORMAT_KEYS[fmt][0]
    if turn_keys and (turn_columns or roles) and isinstance(out.get(list_key), list):
        role_key = turn_keys[0]
        turns = []
        for i, turn in enumerate(out[list_key]):
            if isinstance(turn, dict):
                turn = _rename(turn, turn_columns, turn_keys, where=f"{where}: {list_key}[{i}]", what="it")
                if roles and isinstance(turn.get(role_key), str):
                    turn[role_key] = roles.get(turn[role_key], turn[role_key])
            turns.append(turn)
        out[list_key] = turns
    return out


def renamed_for_detection(record: dict[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """``record`` with every mapped top-level key that it has renamed (``detect_format`` then sees a format's keys)."""
    theirs = {v: k for k, v in columns.items() if v in record and k not in ALL_TURN_KEYS}
    return {theirs.get(k, k): v for k, v in record.items()}


def to_messages(
    record: Any, fmt: str, *, system_prompt: str | None = None, where: str = "record"
) -> list[dict[str, Any]]:
    """Converts one record of format ``fmt`` to ``[{"role", "content"}, ...]``, adding ``system_prompt`` if absent."""
    if not isinstance(record, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(record).__name__}", reason="bad_format")
    missing = [k for k in FORMAT_KEYS[fmt] if k not in record]
    if missing:
        raise FormatError(
            f"{where}: {fmt} record lacks {', '.join(missing)} (has {', '.join(sorted(record)) or 'no keys'})",
            reason="bad_format",
        )
    match fmt:
        case "messages":
            messages = _as_list(record["messages"], "messages", where)
        case "sharegpt":
            messages = [
                _sharegpt_turn(t, i, where)
                for i, t in enumerate(_as_list(record["conversations"], "conversations", where))
            ]
        case "alpaca":
            instruction, extra = record["instruction"], record.get("input") or ""
            if not isinstance(instruction, str) or not isinstance(extra, str):
                raise MessageError(f"{where}: alpaca instruction/input must be strings", reason="bad_content")
            prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
        case "prompt_completion":
            prompt, completion = record["prompt"], record["completion"]
            # TRL's conversational variant: prompt and completion are themselves message lists.
            if isinstance(prompt, list) or isinstance(completion, list):
                messages = _as_list(prompt, "prompt", where) + _as_list(completion, "completion", where)
            else:
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        case _:
            raise FormatError(f"{where}: format {fmt!r} holds no conversation", reason="bad_format")
    if system_prompt and not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _rename(
    record: dict[str, Any],
    columns: Mapping[str, str],
    required: tuple[str, ...],
    *,
    where: str,
    what: str = "the record",
) -> dict[str, Any]:
    """Keys ``columns.values()`` of ``record`` renamed to ``columns.keys()``; a required one absent raises."""
    for field, key in columns.items():
        if key not in record and field in required:
            raise FormatError(
                f"{where}: no field {key!r} (columns: {field} -> {key}); "
                f"{what} has {', '.join(sorted(map(str, record))) or 'no keys'}",
                reason="missing_column",
            )
    mapped = set(columns.values())
    out = {k: v for k, v in record.items() if k not in mapped}
    out.update({field: record[key] for field, key in columns.items() if key in record})
    return out


def _as_list(value: Any, key: str, where: str) -> list:
    if not isinstance(value, list):
        raise FormatError(f"{where}: '{key}' must be a list, got {type(value).__name__}", reason="bad_format")
    return value


def _sharegpt_turn(turn: Any, i: int, where: str) -> dict[str, Any]:
    if not isinstance(turn, dict) or "from" not in turn:
        raise FormatError(f"{where}: conversations[{i}] needs 'from' and 'value'", reason="bad_format")
    speaker = turn["from"]
    if speaker not in SHAREGPT_ROLES:
        raise MessageError(
            f"{where}: conversations[{i}] has unknown 'from' {speaker!r}; valid: {', '.join(SHAREGPT_ROLES)}",
            reason="unknown_role",
        )
    if "value" not in turn:
        raise MessageError(f"{where}: conversations[{i}] ({speaker}) has no 'value'", reason="bad_content")
    return {"role": SHAREGPT_ROLES[speaker], "content": turn["value"]}
