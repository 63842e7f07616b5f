"""A prepared split's rows read back as one Arrow table: what the train driver ships and eval planning probes from."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sftray.data.schema import ROW_SCHEMA


def read_rows(folder: str | Path, *, limit: int | None = None) -> pa.Table:
    """The first ``limit`` rows (None: all) of the Parquet files in ``folder``, in file-name order, as ``ROW_SCHEMA``;
    an empty table when the folder holds none."""
    files = sorted(Path(folder).glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f).cast(ROW_SCHEMA) for f in files]) if files else ROW_SCHEMA.empty_table()
    return table.slice(0, limit) if limit is not None else table
