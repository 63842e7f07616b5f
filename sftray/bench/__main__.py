"""Command line of the bench: ``python -m sftray.bench --size small --out outputs/bench`` (``make bench``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from sftray.bench.run import PARTS, RAY_PARTS
from sftray.bench.sizes import SIZES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftray.bench", description=__doc__)
    parser.add_argument(
        "--size",
        default=os.environ.get("BENCH_SIZE", "small"),
        choices=list(SIZES),
        help="smoke (checks every figure, ~3 min), small (README figures, ~9 min), full (tens of minutes)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("SFTRAY_OUTPUT", "outputs")) / "bench",
        help="folder of bench.json, bench.md and the runs' work files",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("SFTRAY_CACHE", "~/.cache/sftray")).expanduser(),
        help="tiny tokenizer and the bench's random models (built once)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default: the size's, 3 or 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per training run (default: size's)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]

    # Everything the bench needs is local: never reach a model hub (TRL and transformers would try).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    from sftray.bench.report import markdown
    from sftray.bench.run import run_bench
    from sftray.bench.sizes import get_size

    ray_init_seconds = None
    uses_ray = bool(set(parts) & set(RAY_PARTS))
    if uses_ray:
        import ray

        started = time.perf_counter()
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False, configure_logging=False)
        ray_init_seconds = None if os.environ.get("RAY_ADDRESS") else time.perf_counter() - started
    try:
        results = run_bench(
            size=get_size(args.size),
            out_dir=args.out,
            cache_dir=args.cache_dir,
            repeats=args.repeats,
            threads=args.threads,
            parts=parts,
            ray_init_seconds=ray_init_seconds,
        )
    finally:
        if uses_ray:
            ray.shutdown()
    print(markdown(results))
    print(f"\nresults: {args.out / 'bench.json'} (every repeat) and {args.out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
