"""Conversation formats: OpenAI messages, ShareGPT, Alpaca and prompt/completion records -> one messages list.

Pure functions. Each format is recognised by its keys (``detect_format``) and converted by ``to_messages``;
a record that does not fit raises ``FormatError`` saying which keys were expected and which were found.
"""

from __future__ import annotations

from typing import Any

from sftray.data.errors import FormatError, MessageError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""ShareGPT ``from`` values and the role each becomes."""

FORMAT_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
"""Keys that identify each format; ``detect_format`` tries them in this order."""


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
