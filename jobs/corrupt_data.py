#!/usr/bin/env python3
"""Writes a copy of a messages JSONL with a share of its conversations corrupted, to try ``data.prune`` on.

    python jobs/corrupt_data.py --share 0.1 --out outputs/demo-noisy.jsonl      # the builtin demo, 10% corrupted
    python jobs/corrupt_data.py --input chats.jsonl --share 0.05 --seed 1 --out chats-noisy.jsonl

The chosen conversations get their assistant answers shuffled across their questions
(``sftray.data.noise.corrupt_answers``): the format stays right, the answers are wrong. The line numbers (1-based)
of the corrupted conversations go to ``<out>.corrupted.json``, so what pruning removed can be checked against them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sftray.atomic import write_text_atomic
from sftray.data.builtin import resolve_builtin
from sftray.data.noise import corrupt_answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default="builtin:demo", help="messages JSONL, or builtin:demo (the default)")
    parser.add_argument("--share", type=float, default=0.1, help="share of conversations to corrupt, in [0, 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and of the shuffle")
    parser.add_argument("--out", required=True, type=Path, help="the corrupted JSONL to write")
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("SFTRAY_CACHE", "~/.cache/sftray"),
        help="where builtin data is built (paths.cache_dir; default $SFTRAY_CACHE or ~/.cache/sftray)",
    )
    args = parser.parse_args(argv)
    path = (
        resolve_builtin(args.input, Path(args.cache_dir).expanduser())
        if args.input.startswith("builtin:")
        else Path(args.input)
    )
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines]
    if not all(isinstance(r, dict) and isinstance(r.get("messages"), list) for r in rows):
        print(f"error: {path} is not a messages JSONL (every line a {{'messages': [...]}} record)", file=sys.stderr)
        return 1
    try:
        corrupted, changed = corrupt_answers(rows, share=args.share, seed=args.seed)
    except ValueError as exc:
        print(f"error: --share: {exc}", file=sys.stderr)
        return 1
    write_text_atomic(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in corrupted))
    listing = Path(f"{args.out}.corrupted.json")
    write_text_atomic(listing, json.dumps({"source": str(path), "seed": args.seed, "lines": [i + 1 for i in changed]}))
    print(
        f"{args.out}: {len(rows)} conversations, {len(changed)} corrupted ({len(changed) / len(rows):.1%}); {listing}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
