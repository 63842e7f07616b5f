"""One bench run: builds the shared workload, runs each measured part, records the machine, writes the results.

Parts import their code (and TRL, Ray, torch) inside their functions: ``--parts`` runs only what it names, and a
part's heavy imports are paid inside its own timing process.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sftray.bench import report
from sftray.bench.sizes import BenchSize

PARTS = report.SECTIONS
"""Measured parts, in run order: packing, throughput, lm_head, preprocess, overhead, sweep, memory."""
RAY_PARTS = ("preprocess", "overhead", "sweep")
"""Parts that need Ray initialised (the others run in this process or in plain subprocesses)."""


def run_bench(
    *,
    size: BenchSize,
    out_dir: Path,
    cache_dir: Path,
    repeats: int | None = None,
    threads: int | None = None,
    parts: Sequence[str] = PARTS,
    ray_init_seconds: float | None = None,
) -> dict[str, Any]:
    """Runs ``parts`` at ``size`` and writes ``out_dir``/bench.json and bench.md; returns the results dict.

    ``repeats`` and ``threads`` override the size's defaults. The Ray parts expect Ray to be initialised already
    (the CLI starts it and passes how long that took as ``ray_init_seconds``).
    """
    from sftray.bench import workload
    from sftray.bench.throughput import choose_examples

    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown bench part(s) {', '.join(unknown)}; valid: {', '.join(PARTS)}")
    if set(parts) & set(RAY_PARTS):
        import ray

        if not ray.is_initialized():
            raise RuntimeError(f"bench parts {', '.join(RAY_PARTS)} need Ray initialised first")
    _quiet()
    repeats = repeats or size.repeats
    threads = threads or size.threads
    out_dir, cache_dir = Path(out_dir).resolve(), Path(cache_dir).expanduser().resolve()
    work = out_dir / "work"

    tokenizer = workload.tiny_tokenizer(cache_dir=cache_dir)
    demo = workload.encode_conversations(workload.demo_conversations(n=size.demo_conversations), tokenizer=tokenizer)
    model_dir = workload.build_model(out_dir=cache_dir / "bench-models", tokenizer=tokenizer, size=size.model)
    chosen = choose_examples(
        demo, max_seq_len=size.train_seq_len, rows_per_step=size.rows_per_step, steps=size.train_steps
    )
    results: dict[str, Any] = {
        "meta": {
            "size": size.name,
            "repeats": repeats,
            "threads": threads,
            "size_preset": dataclasses.asdict(size),
            "vocab_size": len(tokenizer),
            "machine": _machine(),
            "versions": _versions(),
            "git_commit": _git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "parts": {},
        }
    }
    for part in [p for p in PARTS if p in parts]:
        load, started = _LoadWatch(), time.perf_counter()
        match part:
            case "packing":
                from sftray.bench.packing import measure_packing

                synthetic = workload.synthetic_examples(n=size.synthetic_examples, vocab_size=len(tokenizer))
                rows = measure_packing(
                    datasets={"demo": demo, "synthetic": synthetic},
                    seq_lens=size.packing_seq_lens,
                    pad_id=tokenizer.pad_token_id,
                )
            case "throughput":
                from sftray.bench.throughput import measure_throughput

                rows, summary = measure_throughput(
                    examples=chosen,
                    model_dir=model_dir,
                    max_seq_len=size.train_seq_len,
                    rows_per_step=size.rows_per_step,
                    steps=size.train_steps,
                    threads=threads,
                    repeats=repeats,
                )
                results.setdefault("summary", {}).update(summary)
            case "lm_head":
                from sftray.bench.lm_head import measure_lm_head

                rows, summary = measure_lm_head(
                    chosen,
                    model_dir=model_dir,
                    max_seq_len=size.train_seq_len,
                    steps=size.train_steps,
                    threads=threads,
                    repeats=repeats,
                )
                results.setdefault("summary", {}).update(summary)
            case "preprocess":
                from sftray.bench.preprocess import measure_preprocess

                rows, summary = measure_preprocess(
                    cache_dir=cache_dir,
                    work_dir=work / part,
                    conversations=size.prep_conversations,
                    max_seq_len=size.train_seq_len,
                    repeats=repeats,
                )
                results.setdefault("summary", {}).update(summary)
            case "overhead":
                from sftray.bench.overhead import measure_overhead

                rows, summary = measure_overhead(
                    cache_dir=cache_dir,
                    work_dir=work / part,
                    conversations=size.ray_train_conversations,
                    max_seq_len=size.train_seq_len,
                    model_dir=model_dir,
                    ray_init_seconds=ray_init_seconds,
                    trl_config=results.get("summary", {}).get("trl_best_config"),
                )
                results.setdefault("summary", {}).update(summary)
            case "sweep":
                from sftray.bench.sweep import measure_sweep

                extra = tuple(o.replace("{bench_model}", str(model_dir)) for o in size.sweep_overrides)
                rows, summary = measure_sweep(cache_dir=cache_dir, work_dir=work / part, extra=extra)
                results.setdefault("summary", {}).update(summary)
            case "memory":
                from sftray.bench.memory import measure_memory
                from sftray.data.packing import pack_examples

                rows = measure_memory(
                    model_dir=model_dir,
                    rows=pack_examples(chosen, max_seq_len=size.train_seq_len),
                    rows_per_step=size.rows_per_step,
                    max_seq_len=size.train_seq_len,
                    steps=size.memory_steps,
                    threads=threads,
                )
        results[part] = rows
        results["meta"]["parts"][part] = {"seconds": time.perf_counter() - started, **load.stop()}
        results["meta"]["loaded"] = sorted(p for p, m in results["meta"]["parts"].items() if m["loaded"])
        report.write(results, out_dir=out_dir)  # after every part: a long run leaves what it measured so far
    return results


class _LoadWatch:
    """The 1-minute load average while a part runs, sampled every ``EVERY_S`` seconds by a thread: a part during
    which it exceeded the CPU count is marked as loaded (other work competed with its timings)."""

    EVERY_S = 5.0

    def __init__(self) -> None:
        import threading

        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-load", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.EVERY_S):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])
        cpus = _machine()["cpus"]
        return {
            "load_average_before": self.samples[0],
            "load_average_after": self.samples[-1],
            "load_average_max": max(self.samples),
            "loaded": max(self.samples) > cpus,
        }


def _quiet() -> None:
    """No per-map progress bars from datasets / transformers in the bench's output."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        kib = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        mem_gib = round(int(kib.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cpus": cpus,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("sftray", "torch", "transformers", "trl", "ray", "datasets", "peft", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None
