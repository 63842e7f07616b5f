"""The prep recipe: conversations and pretraining text -> packed Parquet rows and a data report (cached)."""

from __future__ import annotations

from pathlib import Path

from sftray.config import Config
from sftray.data.pipeline import Prepared, prepare
from sftray.models.loading import load_tokenizer


def prep(cfg: Config, *, force: bool = False) -> Prepared:
    """The prepared data of ``cfg``: reused when an identical one exists, built with Ray Data otherwise."""
    tokenizer = load_tokenizer(cfg.model, cache_dir=Path(cfg.paths.cache_dir))
    return prepare(cfg, tokenizer=tokenizer, force=force)
