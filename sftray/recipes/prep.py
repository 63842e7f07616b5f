"""The prep recipe: conversations and pretraining text -> packed Parquet rows and a data report (cached)."""

from __future__ import annotations

from pathlib import Path

from sftray.config import Config
from sftray.data.pipeline import Prepared, prepare
from sftray.models.loading import load_tokenizer


def prep(cfg: Config, *, force: bool = False) -> Prepared:
    """The prepared data of ``cfg``: reused when an identical one exists, built with Ray Data otherwise. With
    ``data.prune`` on, the scoring model (``data.prune.model`` or the base model) is resolved here and handed to the
    pipeline, which runs it in an actor pool; with it off no model is touched."""
    tokenizer = load_tokenizer(cfg.model, cache_dir=Path(cfg.paths.cache_dir))
    scoring = None
    if cfg.data.prune.enabled:
        from sftray.eval.scoring import loss_scoring  # imports torch: only when pruning

        scoring = loss_scoring(cfg, tokenizer=tokenizer)
    return prepare(cfg, tokenizer=tokenizer, force=force, scoring=scoring)
