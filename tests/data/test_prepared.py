"""The prepared-data cache (no Ray): a folder counts as prepared once its report is written, the report holds numpy
numbers as plain JSON, and loading a folder without one says to run sftray prep."""

from __future__ import annotations

import numpy as np
import pytest

from sftray.data.prepared import is_prepared, load_prepared, write_report, writing
from sftray.layout import prepared_dir


def test_a_folder_is_prepared_once_its_report_is_written(tmp_path):
    out = prepared_dir(tmp_path, name="demo", fingerprint="0123456789abcdef")
    assert out == tmp_path / "data" / "demo-0123456789ab"
    with pytest.raises(RuntimeError), writing(out) as tmp:
        write_report(tmp, {"rows": 1})
        raise RuntimeError("crash")  # a crash leaves no prepared-looking folder
    assert not is_prepared(out)
    with pytest.raises(FileNotFoundError, match="run sftray prep"):
        load_prepared(out)
    with writing(out) as tmp:
        write_report(tmp, {"rows": np.int64(3), "share": np.float32(0.5), "path": tmp_path})
    prepared = load_prepared(out)
    assert is_prepared(out) and prepared.report == {"rows": 3, "share": 0.5, "path": str(tmp_path)}
    assert prepared.report_path == out / "report.json" and prepared.train_dir == out / "train"
