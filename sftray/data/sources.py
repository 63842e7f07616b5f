"""Sources: resolve configured paths (files, globs, folders, hub ids, builtins) and read them into located records.

Every record keeps where it came from (``source``, 1-based ``row``: the line of a JSONL file, the item of a JSON
array, the row of a Parquet file or hub split), so any later error can name it. Reading is pure given the file's
bytes (``iter_file_records``); ``sftray.data.pipeline`` runs it inside Ray Data.
"""

from __future__ import annotations

import glob
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftray.config import SourceConfig
from sftray.data.errors import DataError
from sftray.data.formats import detect_format

FILE_TYPES = (".jsonl", ".ndjson", ".json", ".parquet", ".txt")
"""File extensions a local source may have."""
CHAT_FILE_TYPES = (".jsonl", ".ndjson", ".json", ".parquet")
"""File extensions that can hold conversations (a folder of chats ignores the rest, e.g. notes.txt)."""
HF_PREFIX = "hf:"
"""Forces a path to load through ``datasets.load_dataset`` (also works for local dataset folders)."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True, kw_only=True)
class ResolvedSource:
    """A source ready to read: concrete files (or a hub id) and a concrete format."""

    label: str
    """The path as configured (reports and errors use it)."""
    kind: str
    """files | hub"""
    paths: tuple[str, ...]
    """Absolute file paths (files) or the dataset id (hub)."""
    fmt: str
    """Concrete format: messages | sharegpt | alpaca | prompt_completion | text."""
    split: str = "train"
    subset: str | None = None
    text_field: str = "text"


def resolve_source(src: SourceConfig, *, cache_dir: Path, what: str, text: bool = False) -> ResolvedSource:
    """Finds the files behind ``src`` and its format. ``what`` names it in errors (e.g. ``data.sources[0]``)."""
    path = src.path
    if path.startswith("builtin:"):
        from sftray.data.builtin import resolve_builtin

        path = str(resolve_builtin(path, cache_dir))
    if path.startswith(HF_PREFIX) or _looks_like_hub_id(path):
        hub_id = path.removeprefix(HF_PREFIX)
        fmt = "text" if text else src.format
        if fmt == "auto":
            fmt = _chat_format(
                detect_format(_hub_first_row(hub_id, src, what=what), where=f"{what} ({hub_id})"), what=what
            )
        return ResolvedSource(
            label=src.path,
            kind="hub",
            paths=(hub_id,),
            fmt=fmt,
            split=src.split,
            subset=src.subset,
            text_field=src.text_field,
        )
    files = _local_files(path, what=what, types=FILE_TYPES if text else CHAT_FILE_TYPES)
    fmt = "text" if text else src.format
    if fmt == "text" and not text:
        raise ValueError(f"{what}: format 'text' is for mix.sources; conversations need a chat format")
    if fmt == "auto":
        fmt = _chat_format(_detect_file_format(files, what=what), what=what)
    return ResolvedSource(label=src.path, kind="files", paths=tuple(files), fmt=fmt, text_field=src.text_field)


def iter_file_records(path: str, data: bytes) -> Iterator[tuple[int, Any]]:
    """Yields ``(row, record)`` for each record of a file's bytes; a bad record yields ``(row, DataError)``.

    ``.txt`` files are one document: ``{"text": ...}``. Blank lines of JSONL are skipped (they hold no data).
    """
    suffix = Path(path).suffix.lower()
    if not data.strip():
        yield 0, DataError(f"{path}: file is empty", reason="empty_file")
        return
    if suffix in (".jsonl", ".ndjson"):
        for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                yield (
                    lineno,
                    DataError(
                        f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})", reason="invalid_json"
                    ),
                )
    elif suffix == ".json":
        try:
            doc = json.loads(data)
        except json.JSONDecodeError as exc:
            yield exc.lineno, DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})", reason="invalid_json")
            return
        items = doc if isinstance(doc, list) else doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            yield 1, DataError(f'{path}: expected a JSON array of records (or {{"data": [...]}})', reason="bad_format")
            return
        yield from enumerate(items, start=1)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(io.BytesIO(data)).to_pylist(), start=1)
    elif suffix == ".txt":
        yield 1, {"text": data.decode("utf-8", errors="replace")}
    else:
        yield 0, DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_TYPES)}")


def record_text(record: Any, *, text_field: str, where: str) -> str:
    """The text of a pretraining record."""
    value = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no string field {text_field!r} (found {keys})", reason="bad_content")
    return value


def fingerprint_files(paths: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """(path, size, sha256) per file: a content fingerprint of a source."""
    import hashlib

    out = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out.append((p, Path(p).stat().st_size, h.hexdigest()))
    return out


def load_hub_split(src: ResolvedSource) -> Any:
    """``datasets.load_dataset`` for a hub id or local dataset folder (the real loading path users need)."""
    import datasets

    return datasets.load_dataset(src.paths[0], src.subset, split=src.split)


# --- internals -----------------------------------------------------------------------------------------------


def _looks_like_hub_id(path: str) -> bool:
    """``org/name`` or ``name`` that exists nowhere locally (not even its first folder, e.g. ``data/chats``)."""
    p = Path(path).expanduser()
    if not _HUB_ID.match(path) or p.suffix.lower() in FILE_TYPES or p.exists():
        return False
    return not Path(path.split("/")[0]).is_dir()


def _chat_format(fmt: str, *, what: str) -> str:
    if fmt == "text":
        raise ValueError(
            f"{what}: records hold only 'text'; conversations need a chat format "
            "(messages, conversations, instruction/output or prompt/completion)"
        )
    return fmt


def _local_files(path: str, *, what: str, types: tuple[str, ...]) -> list[str]:
    p = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        files = sorted(str(Path(f).resolve()) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise FileNotFoundError(f"{what}: no files match {path!r}")
    elif p.is_dir():
        files = sorted(str(f.resolve()) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in types)
        if not files:
            raise FileNotFoundError(f"{what}: folder {path!r} has no {', '.join(types)} files")
    elif p.is_file():
        files = [str(p.resolve())]
    else:
        raise FileNotFoundError(f"{what}: no such file or folder: {path!r} (cwd: {Path.cwd()})")
    bad = [f for f in files if Path(f).suffix.lower() not in types]
    if bad and bad[0].lower().endswith(".txt"):
        raise ValueError(f"{what}: {bad[0]} is plain text; conversations need JSONL, JSON or Parquet")
    if bad:
        raise ValueError(f"{what}: unsupported file type of {bad[0]!r}; use one of {', '.join(types)}")
    return files


def _detect_file_format(files: list[str], *, what: str) -> str:
    """Format from the first readable record of the first non-empty file."""
    for f in files:
        if f.endswith(".txt"):
            raise ValueError(f"{what}: {f} is plain text; conversations need JSONL, JSON or Parquet")
        for row, record in _peek(f):
            if isinstance(record, DataError):
                if record.reason == "empty_file":
                    break  # the next file may hold the first record
                raise ValueError(f"{what}: cannot detect the format: {record}")
            if not isinstance(record, dict):
                raise ValueError(f"{what}: {f}:{row}: expected a JSON object, got {type(record).__name__}")
            return detect_format(record, where=f"{what}: {f}:{row}")
    raise ValueError(f"{what}: every file is empty: {', '.join(files)}")


def _peek(path: str) -> Iterator[tuple[int, Any]]:
    """The first record of a file without reading all of it (JSONL, Parquet) when possible."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    yield from _one_jsonl(path, lineno, line)
                    return
        return
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if pf.metadata.num_rows:
            yield 1, next(pf.iter_batches(batch_size=1)).to_pylist()[0]
        return
    yield from iter_file_records(path, Path(path).read_bytes())


def _one_jsonl(path: str, lineno: int, line: bytes) -> Iterator[tuple[int, Any]]:
    try:
        yield lineno, json.loads(line)
    except json.JSONDecodeError as exc:
        yield lineno, DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})", reason="invalid_json")


def _hub_first_row(hub_id: str, src: SourceConfig, *, what: str) -> dict:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, src.subset, split=f"{src.split}[:1]")
    except Exception as exc:  # offline, private, misspelled: say it was read as a hub id
        raise ValueError(
            f"{what}: {hub_id!r} is not a local path, and loading it as a Hugging Face dataset "
            f"failed: {type(exc).__name__}: {exc}"
        ) from exc
    if len(ds) == 0:
        raise ValueError(f"{hub_id} split {src.split!r} is empty")
    return ds[0]
