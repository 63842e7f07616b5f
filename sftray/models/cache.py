"""Build-once cache folders for offline assets: safe under concurrent callers, never seen half-built."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from sftray.atomic import atomic_dir


def is_complete(folder: Path, markers: tuple[str, ...]) -> bool:
    """Whether ``folder`` holds every file named in ``markers`` (a finished build)."""
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
        with atomic_dir(target, last=markers) as tmp:
            build(tmp)
    return target
