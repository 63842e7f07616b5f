"""Drop accounting (pure): which rows were bad and why, the first bad row in file order, and drops.jsonl."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from sftray.data.curation import DUPLICATE_REASONS, FILTER_REASONS
from sftray.data.errors import DataError
from sftray.data.pruning import PRUNE_REASONS

log = logging.getLogger(__name__)

POLICY_DROPS = frozenset({"too_long", *DUPLICATE_REASONS, *FILTER_REASONS, *PRUNE_REASONS})
"""Drop reasons decided by policy (data.overlength, curation, data.prune), not by malformed input: counted, never
raised."""


def first_bad_row(meta: Any) -> Any:
    """The first malformed row of ``meta`` (policy drops aside) by file, then line: ``f:2`` before ``f:11`` (hub
    rows by row number); ``None`` when there is none."""
    errors = meta[(meta["reason"] != "") & ~meta["reason"].isin(POLICY_DROPS)]
    if errors.empty:
        return None

    def location(where: str) -> tuple[str, int]:  # "path:line" / "id[split] row N" -> (path, line) / (id, N)
        m = re.fullmatch(r"(.*?)(\d+)", where)
        return (m[1], int(m[2])) if m else (where, -1)

    keys = [location(w) for w in errors["where"]]
    return errors.iloc[min(range(len(keys)), key=keys.__getitem__)]


def check_drops(meta: Any, *, on_error: str, what: str) -> Counter:
    """Counts drops by reason; with ``on_error=raise`` the first malformed row (``first_bad_row``) raises."""
    bad = meta[meta["reason"] != ""]
    errors = bad[~bad["reason"].isin(POLICY_DROPS)]
    first = first_bad_row(meta)
    if on_error == "raise" and first is not None:
        more = f" ({len(errors) - 1} more bad {what}s)" if len(errors) > 1 else ""
        raise DataError(
            f"{first['error']}{more}. Fix the data or set data.on_error=drop to skip and count them.",
            reason=first["reason"],
        )
    counts = Counter(bad["reason"].tolist())
    for reason, group in bad.groupby("reason"):
        log.warning("dropped %d %s(s): %s; first: %s", len(group), what, reason, group["error"].iloc[0])
    return counts


def write_drops(path: Path, *metas: Any) -> None:
    with path.open("w") as fh:
        for meta in metas:
            for r in meta[meta["reason"] != ""].itertuples():
                fh.write(json.dumps({"where": r.where, "reason": r.reason, "error": r.error}) + "\n")
