"""``data.val_sources`` on files of realistic size: several Ray Data blocks per split, with and without a mix."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sftray.data.prepared import load_prepared

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.parametrize("mix", ["pydoc", "none"])
def test_separate_validation_file_of_realistic_size(ray_local, cache_dir, tmp_path, write_sums, capsys, mix):
    # Sizes of a public grade-school-math set's train/test files: thousands of rows span several blocks per split.
    train = write_sums(tmp_path / "train.jsonl", range(7473))
    val = write_sums(tmp_path / "val.jsonl", range(10_000, 11_319))
    out = tmp_path / "out"
    args = [
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={out}",
        "data=files",
        f"data.sources=[{{path:'{train}'}}]",
        f"data.val_sources=[{{path:'{val}'}}]",
        f"mix={mix}",
    ]
    assert main(["prep", *args]) == 0
    (folder,) = (out / "data").iterdir()
    report = load_prepared(folder).report
    assert report["conversations"]["train"] == 7473 and report["conversations"]["val"] == 1319
    assert pq.read_table(folder / "train", columns=["num_trained"]).num_rows > 0
    val_rows = pq.read_table(folder / "val", columns=["seq_lens"]).to_pylist()
    assert sum(len(r["seq_lens"]) for r in val_rows) == 1319  # every validation conversation, packed
    assert (report["splits"]["train"]["pretrain_tokens"] > 0) == (mix == "pydoc")
    assert Path(report["out_dir"]) == folder
