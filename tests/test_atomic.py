"""Atomic writes (sftray.atomic): a file or folder appears complete under its final name, or not at all."""

from __future__ import annotations

import pytest

from sftray.atomic import atomic_dir, write_text_atomic


def test_write_text_atomic_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b.txt"
    write_text_atomic(path, "first ünïcode")
    write_text_atomic(path, "second")
    assert path.read_text(encoding="utf-8") == "second"
    assert [p.name for p in path.parent.iterdir()] == ["b.txt"]  # no temp file left


def test_atomic_dir_renames_a_new_folder_into_place(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "x.txt").write_text("x")
        assert not target.exists()  # invisible until the block succeeds
    assert (target / "x.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_merges_markers_last_or_replaces(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target, last=("done",)) as tmp:
        (tmp / "done").write_text("")
        (tmp / "data").write_text("d")
    assert sorted(p.name for p in target.iterdir()) == ["data", "done", "old.txt"]
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "new.txt").write_text("n")
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_atomic_dir_leaves_the_target_alone_when_the_block_fails(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("h")
        raise RuntimeError("build failed")
    assert list(tmp_path.iterdir()) == []
