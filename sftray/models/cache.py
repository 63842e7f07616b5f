"""Build-once cache folders for offline assets: safe under concurrent callers, never seen half-built."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def is_complete(folder: Path, markers: tuple[str, ...]) -> bool:
    return all((folder / name).is_file() for name in markers)


def build_once(target: Path, *, markers: tuple[str, ...], build: Callable[[Path], object]) -> Path:
    """``target`` once it holds every file in ``markers``, built if needed by ``build(tmp_dir)``.

    A file lock serialises builders (several Ray actors may ask at once); the build happens in a temp folder
    that is renamed into place. If ``target`` already exists without the markers (other assets, or a leftover),
    the built files are moved in one by one, markers last, so it never looks complete too early.
    """
    target = Path(target)
    if is_complete(target, markers):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if is_complete(target, markers):  # another caller built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            build(tmp)
            if not target.exists():
                os.replace(tmp, target)
            else:
                for name in sorted((p.name for p in tmp.iterdir()), key=lambda name: name in markers):
                    os.replace(tmp / name, target / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
