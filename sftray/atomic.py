"""Atomic writes: a file or a folder appears under its final name complete, or not at all.

Both are built beside their target (same filesystem, so the final ``os.replace`` is a rename) under a hidden
``.<name>.`` prefix, and the temporary copy is removed whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` via a temp file + ``os.replace``: readers never see a partial file."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temp file path beside ``path`` for any writer (e.g. ``pyarrow.parquet.write_table``); when the
    ``with`` block succeeds, the file becomes ``path`` (``os.replace``), otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: Path, *, replace: bool = False, last: Collection[str] = ()) -> Iterator[Path]:
    """Yields an empty temp folder beside ``target``; when the ``with`` block succeeds, it becomes ``target``.

    If ``target`` does not exist, the folder is renamed into place. If it does, ``replace=True`` removes it first
    (a reader may briefly find no folder, never a half-written one); otherwise the new entries are moved into it
    one by one, the names in ``last`` (completion markers) last, so it never looks complete too early. If the
    block raises, ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield tmp
        if target.exists() and replace:
            shutil.rmtree(target)
        if not target.exists():
            os.replace(tmp, target)
        else:
            for name in sorted((p.name for p in tmp.iterdir()), key=lambda name: name in last):
                os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
