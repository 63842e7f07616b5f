"""The prepared-data cache: a prepared dataset's folder (named by its fingerprint, ``sftray.layout.prepared_dir``),
written atomically, reused while the fingerprint holds, and loaded by training.

A folder holds ``train/``, ``val/`` and ``pretrain_heldout/`` (packed Parquet), ``tokenizer/``, ``drops.jsonl`` and
``report.json``, written last: a folder with a report is complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftray.atomic import atomic_dir

REPORT_FILE = "report.json"
TOKENIZER_DIR = "tokenizer"
DROPS_FILE = "drops.jsonl"
"""One JSON line per dropped row: its reason and the message naming file and line."""


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """Where a prepared dataset lives and what its report says."""

    out_dir: Path
    report: dict[str, Any]

    @property
    def train_dir(self) -> Path:
        return self.out_dir / "train"

    @property
    def val_dir(self) -> Path:
        return self.out_dir / "val"

    @property
    def heldout_dir(self) -> Path:
        """Held-out pretraining windows: the forgetting measure."""
        return self.out_dir / "pretrain_heldout"

    @property
    def tokenizer_dir(self) -> Path:
        return self.out_dir / TOKENIZER_DIR

    @property
    def report_path(self) -> Path:
        """``report.json``: what the prep did (sources, drops, splits, mix), written last."""
        return self.out_dir / REPORT_FILE


def load_prepared(out_dir: Path) -> Prepared:
    """A prepared dataset folder written earlier by ``prepare``."""
    report = Path(out_dir) / REPORT_FILE
    if not report.is_file():
        raise FileNotFoundError(f"{out_dir} is not a prepared dataset (no {REPORT_FILE}); run sftray prep")
    return Prepared(out_dir=Path(out_dir), report=json.loads(report.read_text()))


def is_prepared(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a complete prepared dataset (its report is written last)."""
    return (Path(out_dir) / REPORT_FILE).is_file()


@contextmanager
def writing(out_dir: Path) -> Iterator[Path]:
    """A temporary folder that becomes ``out_dir`` (replacing it) when the block ends without an error: a crash
    never leaves a prepared-looking folder."""
    with atomic_dir(out_dir, replace=True) as tmp:
        yield tmp


def write_report(folder: Path, report: dict[str, Any]) -> None:
    """``report.json`` of the dataset being written to ``folder`` (numpy numbers as plain JSON numbers)."""
    (Path(folder) / REPORT_FILE).write_text(json.dumps(report, indent=2, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return str(obj)
