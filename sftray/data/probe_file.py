"""The generation-probe file (``data.probes``): the one reader of its records, for eval's probes and for dedup.

A probe is a conversation the model continues and, optionally, the ``reference`` answer and a ``format`` (a regular
expression a compliant answer matches). A line of the file is one JSON object, either a probe record
(``{"prompt": "...", "reference": "..."}`` or ``{"messages": [...], "reference": "..."}``) or any chat record a data
source may hold (messages, sharegpt, alpaca, prompt_completion; ``sftray.data.formats``) whose last assistant turn is
the reference. ``data.probe_columns`` maps the file's own names as a source's ``columns`` does: ``{prompt: question,
reference: answer}`` (or ``{prompt: question, completion: answer}``, the source's own mapping) reads GSM8K's
``{"question", "answer"}`` lines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftray.config import DataConfig
from sftray.data.builtin import resolve_builtin
from sftray.data.errors import FormatError, MessageError
from sftray.data.formats import (
    ALL_TURN_KEYS,
    FORMAT_KEYS,
    OPTIONAL_KEYS,
    TURN_KEYS,
    detect_format,
    rename_fields,
    to_messages,
)

PROBE_FORMAT = "probe"
"""The probe record's own shape (``sftray.config.PROBE_FIELDS``), next to the chat formats of ``FORMAT_KEYS``."""
OPTIONAL_FIELDS = ("reference", "format", *(k for keys in OPTIONAL_KEYS.values() for k in keys))
"""Fields a line may lack though ``data.probe_columns`` maps them (a probe without a reference checks the format)."""


@dataclass(frozen=True, kw_only=True)
class ProbeRecord:
    """One probe of the file."""

    messages: list[dict[str, Any]]
    """The conversation the model continues (``data.system_prompt`` added when it has no system turn)."""
    reference: str | None
    """The expected answer; None: the probe checks the format only."""
    format: str | None
    """A regular expression the whole answer must match to comply; None: any ended answer complies."""
    where: str
    """``file:line``."""

    def exchange(self) -> list[dict[str, Any]] | None:
        """The conversation with the reference as the assistant's answer (what a training copy of the probe holds);
        None without a reference."""
        if self.reference is None:
            return None
        return [*self.messages, {"role": "assistant", "content": self.reference}]


def probes_path(probes: str, *, cache_dir: str | Path) -> Path:
    """The file ``data.probes`` names (a builtin one is written on first use)."""
    return resolve_builtin(probes, Path(cache_dir)) if probes.startswith("builtin:") else Path(probes).expanduser()


def probe_file(data: DataConfig, *, cache_dir: str | Path) -> Path | None:
    """The readable file ``data.probes`` names, or None when it names none: the one place that resolves it. A
    missing or unreadable file raises one line naming the key and the path."""
    if not data.probes:
        return None
    path = probes_path(data.probes, cache_dir=cache_dir)
    if not path.is_file():
        raise FileNotFoundError(f"data.probes={data.probes}: no such file (a JSONL of probes, or null)")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"data.probes={data.probes}: cannot read it ({exc.strerror})") from None
    return path


def probe_records(data: DataConfig, *, cache_dir: str | Path, limit: int | None = None) -> list[ProbeRecord]:
    """The first ``limit`` probes of ``data.probes`` (None: all; none without a file), read with the data config's
    ``probe_columns`` and ``system_prompt``: what eval probes and what dedup checks training rows against."""
    path = probe_file(data, cache_dir=cache_dir)
    if path is None:
        return []
    return read_probes(path, columns=data.probe_columns, system_prompt=data.system_prompt, limit=limit)


def read_probes(
    path: Path, *, columns: Mapping[str, str], system_prompt: str | None, limit: int | None = None
) -> list[ProbeRecord]:
    """The first ``limit`` probes of ``path`` (None: all); ``columns``: ``data.probe_columns``. A bad line raises
    ``ValueError`` naming ``file:line``, what is wrong and the fix."""
    probes = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        try:
            probes.append(_probe(record, columns=columns, system_prompt=system_prompt, where=where))
        except (FormatError, MessageError) as exc:
            raise ValueError(str(exc)) from None
        if len(probes) == limit:
            break
    if not probes:
        raise ValueError(f"{path}: no probes")
    return probes


def _probe(record: Any, *, columns: Mapping[str, str], system_prompt: str | None, where: str) -> ProbeRecord:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    record = _renamed(record, columns, where=where)
    fmt = _format(record, where=where)
    reference, pattern = record.get("reference"), record.get("format")
    for key, value in (("reference", reference), ("format", pattern)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{where}: 'format' is not a regular expression ({exc})") from None
    if fmt == PROBE_FORMAT:
        messages = [{"role": "user", "content": record["prompt"]}]
        if system_prompt:
            messages = [{"role": "system", "content": system_prompt}, *messages]
        return ProbeRecord(messages=messages, reference=reference, format=pattern, where=where)
    turn_columns = {k: v for k, v in columns.items() if k in TURN_KEYS.get(fmt, ())}
    record = rename_fields(record, fmt, columns=turn_columns, where=where)
    messages = to_messages(record, fmt, system_prompt=system_prompt, where=where)
    last = messages[-1] if messages else None
    if reference is None and isinstance(last, dict) and last.get("role") == "assistant" and len(messages) > 1:
        reference, messages = last.get("content"), messages[:-1]  # the last answer is the reference
        if not isinstance(reference, str):
            raise ValueError(f"{where}: the last assistant turn (the reference) must be a string")
    if not any(isinstance(m, dict) and m.get("role") != "system" for m in messages):
        raise ValueError(f"{where}: the probe has no turn for the model to answer")
    return ProbeRecord(messages=messages, reference=reference, format=pattern, where=where)


def _renamed(record: dict[str, Any], columns: Mapping[str, str], *, where: str) -> dict[str, Any]:
    """``record`` with its mapped top-level keys given the probe's or chat format's names (turn keys are renamed
    once the format is known); a mapped key the record lacks raises, unless its field is optional."""
    top = {field: key for field, key in columns.items() if field not in ALL_TURN_KEYS}
    for field, key in top.items():
        if key not in record and field not in OPTIONAL_FIELDS:
            raise ValueError(
                f"{where}: no field {key!r} (columns: {field} -> {key}); the line has "
                f"{', '.join(sorted(map(str, record))) or 'no keys'}"
            )
    mapped = set(top.values())
    return {k: v for k, v in record.items() if k not in mapped} | {f: record[k] for f, k in top.items() if k in record}


def _format(record: dict[str, Any], *, where: str) -> str:
    """``PROBE_FORMAT`` for ``{"prompt": "..."}`` without a completion, else the chat format of the record."""
    if isinstance(record.get("prompt"), str) and "completion" not in record:
        return PROBE_FORMAT
    try:
        fmt = detect_format(record, where=where)
    except FormatError:
        fmt = "text"
    if fmt == "text":
        chat = "; ".join(f"{f}: {', '.join(k)}" for f, k in FORMAT_KEYS.items() if f != "text")
        raise ValueError(
            f"{where}: a probe needs 'prompt' (string) or 'messages', or the keys of a chat record ({chat}); this "
            f"line has {', '.join(sorted(record)) or 'no keys'}: map your names with data.probe_columns, e.g. "
            "+data.probe_columns={prompt: question, reference: answer}"
        )
    return fmt
