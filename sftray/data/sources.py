"""Sources: resolve configured paths (files, globs, folders, hub ids, builtins) and read them into located records.

Every record keeps where it came from (``source``, 1-based ``row``: the line of a JSONL file, the item of a JSON
array, the row of a Parquet file or hub split), so any later error can name it. Reading is pure given the file's
bytes (``iter_file_records``); ``sftray.data.encoder`` runs it inside Ray Data tasks.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftray.config import SourceConfig
from sftray.data.builtin import resolve_builtin
from sftray.data.chat import ROLES
from sftray.data.errors import DataError
from sftray.data.formats import LIST_FORMATS, detect_format, rename_fields, renamed_for_detection

log = logging.getLogger(__name__)

FILE_TYPES = (".jsonl", ".ndjson", ".json", ".parquet", ".txt")
"""File extensions a local source may have."""
LINE_FILE_TYPES = (".jsonl", ".ndjson")
"""One record per line: read in pieces (``line_chunks``)."""
CHAT_FILE_TYPES = (".jsonl", ".ndjson", ".json", ".parquet")
"""File extensions that can hold conversations (a folder of chats ignores the rest, e.g. notes.txt, with a warning)."""
HF_PREFIX = "hf:"
"""Forces a path to load through ``datasets.load_dataset`` (also works for local dataset folders)."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True, kw_only=True)
class ResolvedSource:
    """A source ready to read: concrete files (or a hub id) and a concrete format for each."""

    label: str
    """The path as configured (reports and errors use it)."""
    kind: str
    """files | hub"""
    paths: tuple[str, ...]
    """Absolute file paths (files) or the dataset id (hub)."""
    fmt: str
    """Concrete format: messages | sharegpt | alpaca | prompt_completion | text (a mixed folder: its first file's)."""
    fmts: tuple[str, ...] = ()
    """The format of each of ``paths`` (format auto detects each file's); empty: every file is ``fmt``."""
    split: str = "train"
    subset: str | None = None
    text_field: str = "text"
    columns: dict[str, str] = field(default_factory=dict)
    """{format's field: the records' key}, applied by ``canonical_record``."""
    roles: dict[str, str] = field(default_factory=dict)
    """{the records' role value: system | user | assistant}, applied by ``canonical_record``."""
    ignored: tuple[str, ...] = ()
    """Files of a folder source that no reader takes (e.g. notes.txt in a chat folder); logged, never read."""

    def format_of(self, path: str) -> str:
        """The format of ``path``, one of the source's files (a hub source's dataset id: ``fmt``)."""
        if not self.fmts:
            return self.fmt
        if path not in self.paths:
            raise ValueError(f"{path} is not a file of source {self.label!r}")
        return self.fmts[self.paths.index(path)]


def resolve_source(src: SourceConfig, *, cache_dir: Path, what: str, text: bool = False) -> ResolvedSource:
    """Finds the files behind ``src`` and the format of each. ``what`` names it in errors (e.g. ``data.sources[0]``).

    ``format: auto`` detects each file's format from its first record (after renaming by ``src.columns``), so a
    folder may mix formats; a file whose first record fits no format takes the format of the first that does
    (its rows then fail one by one, by line). A folder's files that no reader takes are logged and listed in
    ``ignored``.
    """
    path = src.path
    if text:
        # a text source's only field is its text: columns {text: body} is text_field: body
        src = dataclasses.replace(src, text_field=src.columns.get("text", src.text_field), columns={}, roles={})
    for value, role in src.roles.items():
        if role not in ROLES:
            raise ValueError(f"{what}.roles: {value!r} -> {role!r}; a role is one of {', '.join(ROLES)}")
    if path.startswith("builtin:"):
        path = str(resolve_builtin(path, cache_dir))
    if path.startswith(HF_PREFIX) or _looks_like_hub_id(path):
        hub_id = path.removeprefix(HF_PREFIX)
        fmt = "text" if text else src.format
        if fmt == "auto":
            first = renamed_for_detection(_hub_first_row(hub_id, src, what=what), src.columns)
            fmt = _chat_format(detect_format(first, where=f"{what} ({hub_id})"), what=what)
            _check_mapping(src, [fmt], what=what)
        return ResolvedSource(
            label=src.path,
            kind="hub",
            paths=(hub_id,),
            fmt=fmt,
            fmts=(fmt,),
            split=src.split,
            subset=src.subset,
            text_field=src.text_field,
            columns=dict(src.columns),
            roles=dict(src.roles),
        )
    types = FILE_TYPES if text else CHAT_FILE_TYPES
    files, ignored = _local_files(path, what=what, types=types)
    if ignored:
        shown = ", ".join(ignored[:10]) + (f", ... and {len(ignored) - 10} more" if len(ignored) > 10 else "")
        log.warning(
            "%s: ignoring %d file(s) of folder %r that no reader takes (a %s source reads %s): %s",
            what,
            len(ignored),
            path,
            "text" if text else "chat",
            ", ".join(types),
            shown,
        )
    fmt = "text" if text else src.format
    if fmt == "text" and not text:
        raise ValueError(f"{what}: format 'text' is for mix.sources; conversations need a chat format")
    if fmt == "auto":
        fmts = _detect_file_formats(files, what=what, columns=src.columns)
        for f, detected in zip(files, fmts):
            _chat_format(detected, what=f"{what}: {f}" if len(files) > 1 else what)
        _check_mapping(src, fmts, what=what)
    else:
        fmts = [fmt] * len(files)
    return ResolvedSource(
        label=src.path,
        kind="files",
        paths=tuple(files),
        fmt=fmts[0],
        fmts=tuple(fmts),
        text_field=src.text_field,
        columns=dict(src.columns),
        roles=dict(src.roles),
        ignored=tuple(ignored),
    )


def iter_source_records(
    src: ResolvedSource, path: str, data: bytes, *, first_line: int = 1, whole: bool = True
) -> Iterator[tuple[int, str, Any]]:
    """Yields ``(row, fmt, record)`` for one file of ``src`` (or one ``line_chunks`` piece of it: ``first_line``,
    ``whole=False``): ``iter_file_records`` with the file's format, each record renamed to that format's fields
    (``canonical_record``); a bad record is a ``DataError``."""
    fmt = src.format_of(path)
    for row, record in iter_file_records(path, data, first_line=first_line, whole=whole):
        if not isinstance(record, DataError):
            record = canonical_record(src, record, fmt=fmt, where=f"{path}:{row}")
        yield row, fmt, record


def canonical_record(src: ResolvedSource, record: Any, *, fmt: str, where: str) -> Any:
    """``record`` with the source's ``columns`` and ``roles`` applied (as it is without them), or the
    ``DataError`` (``missing_column``, naming ``where`` and the keys the record has) when a mapped key is absent."""
    if not (src.columns or src.roles):
        return record
    try:
        return rename_fields(record, fmt, columns=src.columns, roles=src.roles, where=where)
    except DataError as exc:
        return exc


def iter_file_records(path: str, data: bytes, *, first_line: int = 1, whole: bool = True) -> Iterator[tuple[int, Any]]:
    """Yields ``(row, record)`` for each record of a file's bytes; a bad record yields ``(row, DataError)``.

    ``.txt`` files are one document: ``{"text": ...}``. Blank lines of JSONL are skipped (they hold no data).
    Text must be UTF-8: a JSONL line (or a .txt / .json file) that is not yields ``bad_encoding`` naming the line.
    A JSONL piece cut by ``line_chunks`` passes its ``first_line`` and ``whole=False`` (only a whole file is empty).
    """
    suffix = Path(path).suffix.lower()
    if not data.strip():
        if whole:
            yield 0, DataError(f"{path}: file is empty", reason="empty_file")
        return
    if suffix in LINE_FILE_TYPES:
        # bytes.splitlines splits at \n, \r\n and \r only: U+2028 or U+0085 inside a JSON string is no line end
        for lineno, line in enumerate(data.splitlines(), start=first_line):
            if line.strip():
                yield lineno, _jsonl_record(path, lineno, line)
    elif suffix == ".json":
        try:
            doc = json.loads(data)
        except json.JSONDecodeError as exc:
            yield exc.lineno, DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})", reason="invalid_json")
            return
        except UnicodeDecodeError as exc:
            yield _bad_encoding(path, data, exc)
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
        try:
            yield 1, {"text": data.decode("utf-8")}
        except UnicodeDecodeError as exc:
            yield _bad_encoding(path, data, exc)
    else:
        yield 0, DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_TYPES)}")


def line_chunks(path: str, *, target_bytes: int) -> list[tuple[int, int, int]]:
    """``(offset, length, first line)`` pieces of about ``target_bytes`` that together are the file ``path``.

    A JSONL file is cut after a newline, so that each piece holds whole lines and readers can work on the pieces
    in parallel (one piece per Ray Data block); its first line's number is counted the way ``iter_file_records``
    numbers lines. Any other file is one piece.
    """
    size = Path(path).stat().st_size
    if Path(path).suffix.lower() not in LINE_FILE_TYPES or size <= target_bytes:
        return [(0, size, 1)]
    pieces, offset, line = [], 0, 1
    with open(path, "rb") as fh:
        while offset < size:
            fh.seek(offset)
            data = fh.read(target_bytes)
            if offset + len(data) < size:
                rest = b""
                while not data.endswith(b"\n") and offset + len(data) + len(rest) < size:
                    rest += fh.read(1 << 16)
                    cut = rest.find(b"\n")
                    if cut >= 0:
                        rest = rest[: cut + 1]
                        break
                data += rest
            pieces.append((offset, len(data), line))
            offset += len(data)
            line += len(data.splitlines())
    return pieces


def read_piece(path: str, offset: int, length: int) -> bytes:
    """The bytes of one ``line_chunks`` piece."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(length)


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


def _local_files(path: str, *, what: str, types: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The files of ``path`` that a reader takes, and a folder's others (hidden ones, e.g. .git/, left out)."""
    p = Path(path).expanduser()
    ignored: list[str] = []
    if any(ch in path for ch in "*?["):
        files = sorted(str(Path(f).resolve()) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise FileNotFoundError(f"{what}: no files match {path!r}")
    elif p.is_dir():
        found = [f for f in p.rglob("*") if f.is_file()]
        files = sorted(str(f.resolve()) for f in found if f.suffix.lower() in types)
        ignored = sorted(
            str(f.resolve())
            for f in found
            if f.suffix.lower() not in types and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
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
    return files, ignored


def _detect_file_formats(files: list[str], *, what: str, columns: dict[str, str]) -> list[str]:
    """Each file's format, from its first record. An empty file, or one whose first record fits no format, takes
    the first detected format (with a warning for the latter); when no file has one, the first file's error."""
    fmts: list[str | None] = []
    errors: list[tuple[str, ValueError]] = []
    for f in files:
        try:
            fmts.append(_detect_one(f, what=what, columns=columns))
        except ValueError as exc:  # DataError included
            fmts.append(None)
            errors.append((f, exc))
    first = next((fmt for fmt in fmts if fmt is not None), None)
    if first is None:
        if errors:
            raise errors[0][1]
        raise ValueError(f"{what}: every file is empty: {', '.join(files)}")
    for f, exc in errors:
        log.warning("%s: %s; reading %s as %s, row by row", what, exc, f, first)
    return [fmt or first for fmt in fmts]


def _detect_one(f: str, *, what: str, columns: dict[str, str]) -> str | None:
    """The format of one file from its first record (``None``: the file is empty)."""
    if f.endswith(".txt"):
        raise ValueError(f"{what}: {f} is plain text; conversations need JSONL, JSON or Parquet")
    for row, record in _peek(f):
        if isinstance(record, DataError):
            if record.reason == "empty_file":
                return None
            raise ValueError(f"{what}: cannot detect the format: {record}")
        if not isinstance(record, dict):
            raise ValueError(f"{what}: {f}:{row}: expected a JSON object, got {type(record).__name__}")
        return detect_format(renamed_for_detection(record, columns), where=f"{what}: {f}:{row}")
    return None


def _check_mapping(src: SourceConfig, fmts: list[str], *, what: str) -> None:
    """With format auto, ``columns`` and ``roles`` must fit some detected format (config time knew no format)."""
    fields = {f for fmt in set(fmts) for f in SourceConfig.FIELDS[fmt]}
    for key in src.columns:
        if key not in fields:
            valid = "; ".join(f"{fmt}: {', '.join(SourceConfig.FIELDS[fmt])}" for fmt in sorted(set(fmts)))
            raise ValueError(f"{what}.columns: {key!r} is not a field of the detected format(s) ({valid})")
    if src.roles and not set(LIST_FORMATS) & set(fmts):
        with_roles = " and ".join(LIST_FORMATS)
        raise ValueError(f"{what}.roles: only {with_roles} records have roles; detected {', '.join(fmts)}")


def _peek(path: str) -> Iterator[tuple[int, Any]]:
    """The first record of a file without reading all of it (JSONL, Parquet) when possible."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    yield lineno, _jsonl_record(path, lineno, line)
                    return
        return
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if pf.metadata.num_rows:
            yield 1, next(pf.iter_batches(batch_size=1)).to_pylist()[0]
        return
    yield from iter_file_records(path, Path(path).read_bytes())


def _jsonl_record(path: str, lineno: int, line: bytes) -> Any:
    """One JSONL line's record, or the ``DataError`` (``bad_encoding``, ``invalid_json``) naming file:line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return DataError(
            f"{path}:{lineno}: not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})",
            reason="bad_encoding",
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # Some of json's messages end in "at" ("Unterminated string starting at"): the column completes them.
        where = f"{exc.msg} column" if exc.msg.endswith(" at") else f"{exc.msg} at column"
        return DataError(f"{path}:{lineno}: not valid JSON ({where} {exc.colno})", reason="invalid_json")


def _bad_encoding(path: str, data: bytes, exc: UnicodeDecodeError) -> tuple[int, DataError]:
    """``(line, DataError)`` for the first byte of ``data`` that is not UTF-8."""
    lineno = data.count(b"\n", 0, exc.start) + 1
    column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    message = f"{path}:{lineno}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column})"
    return lineno, DataError(message, reason="bad_encoding")


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
