"""The base model's eval, cached by fingerprint: computed once per (base model, prepared data, eval config).

Every run and every sweep trial starts by evaluating the untrained model (val loss, held-out pretraining loss,
generation probes): forgetting is measured against it. It depends only on the inputs hashed by ``base_eval_key``,
so the first run computes it and every later run or trial that shares the key reads it from ``<key>.json`` in
``sftray.layout.base_eval_dir``. A lock file next to it makes concurrent trials wait for the one that computes
instead of computing it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftray.atomic import write_text_atomic
from sftray.config import Config
from sftray.layout import base_eval_dir

EVAL_INPUTS = ("num_probes", "max_new_tokens", "max_new_tokens_cap", "max_eval_rows")
"""The eval knobs the base eval's values depend on (selection knobs such as the forgetting budget do not)."""


def base_eval_key(
    cfg: Config,
    *,
    base_model: str,
    data_fingerprint: str,
    probes: list[dict],
    max_new_tokens: int,
    adapter: str | None = None,
    earlier_probes: dict[str, Any] | None = None,
) -> str:
    """A hash of everything the base model's eval depends on.

    The model (its files' names, sizes and modification times, or the hub id), the prepared data's fingerprint
    (rows, tokenizer, template), the eval config, the probes and their generation limit, the fine-tuning method
    (LoRA wraps the model before the eval), the per-rank eval batch and the device kind (precision follows it); in a
    multi-stage run also the adapter the stage continues and the earlier stages' probes.
    """
    parts = {
        "model": model_identity(base_model),
        "data": data_fingerprint,
        "eval": {k: getattr(cfg.eval, k) for k in EVAL_INPUTS},
        "probes": probes,
        "max_new_tokens": max_new_tokens,
        "method": cfg.train.method,
        "micro_batch_size": cfg.train.micro_batch_size,
        "gpu": cfg.train.use_gpu,
    }
    if adapter is not None or earlier_probes:
        parts["stages"] = {"adapter": adapter and model_identity(adapter), "earlier_probes": earlier_probes}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_path(output_dir: str | Path, key: str) -> Path:
    """The cached eval of ``key``, under ``paths.output_dir`` (shared storage on a cluster, like the runs)."""
    return base_eval_dir(output_dir) / f"{key}.json"


def load(path: Path) -> tuple[dict[str, float], list[dict]] | None:
    """(metrics, probe table) of a cached eval, or None."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["metrics"], saved["table"]


def save(path: Path, metrics: dict[str, float], table: list[dict]) -> None:
    write_text_atomic(path, json.dumps({"metrics": metrics, "table": table}, indent=1))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``path``'s lock file: one process computes a key's eval, the others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def model_identity(base_model: str) -> Any:
    folder = Path(base_model)
    if not folder.is_dir():
        return base_model  # a hub id: from_pretrained resolves the same snapshot while it is cached
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file()]
