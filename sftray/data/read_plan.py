"""The read plan: every source cut into pieces (one Ray Data task reads and encodes each), sized for the cluster.

The output does not depend on the cut: every record's key comes from its ``file:line`` (or hub row), not from the
piece that read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftray.data.sources import ResolvedSource, line_chunks, load_hub_split

PIECES_PER_CPU = 2
"""Pieces per CPU of the cluster: two, so no CPU idles long while another finishes a piece, and few, because Ray
Data leaves a pause between one task's end and the next one's start that more, smaller pieces multiply."""
PIECE_BYTES = (1 << 18, 1 << 24)
"""Bounds on a JSONL piece's size (256 KiB .. 16 MiB): small files stay whole, big ones spread over every CPU."""


def pieces(sources: list[ResolvedSource], splits: list[str], *, cpus: int) -> list[dict[str, Any]]:
    """The read plan: each source cut into pieces (JSONL by line ranges, hub splits by row ranges, other files
    whole) of a size that gives every CPU a few; the output does not depend on the cut (keys come from file:line)."""
    files = [(p, Path(p).stat().st_size) for s in sources if s.kind == "files" for p in s.paths]
    total = sum(size for _, size in files)
    target = int(min(max(total / (cpus * PIECES_PER_CPU), PIECE_BYTES[0]), PIECE_BYTES[1]))
    out = []
    for index, (src, split) in enumerate(zip(sources, splits)):
        base = {"source": index, "split": split, "path": "", "offset": 0, "length": 0, "first_line": 1, "whole": True}
        if src.kind == "hub":
            n = len(load_hub_split(src))
            step = max(1, -(-n // (cpus * PIECES_PER_CPU)))
            out += [{**base, "offset": lo, "length": min(step, n - lo)} for lo in range(0, n, step)]
            continue
        for path in src.paths:
            cut = line_chunks(path, target_bytes=target)
            out += [
                {**base, "path": path, "offset": o, "length": n, "first_line": line, "whole": len(cut) == 1}
                for o, n, line in cut
            ]
    return out
