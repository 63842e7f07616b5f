"""The prepared data's fingerprint: a hash of everything the output depends on, so unchanged inputs reuse it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from sftray.config import Config, PruneConfig
from sftray.data.chat import template_hash
from sftray.data.probe_file import probe_file
from sftray.data.sources import ResolvedSource, fingerprint_files, load_hub_split

DATA_VERSION = 5
"""Bumped whenever the stored row schema or any transform changes; part of the fingerprint. 4: the report's prune
section and data.prune in its config; 5: mix.max_repeats and the report's passes over the corpus, and dedup's
duplicate_of_eval covers every probe of the file (messages-style and data.probe_columns-mapped ones too)."""
CONFIG_INPUTS = ("seed", "window_len", "data", "mix", "model")
"""Top-level config keys ``fingerprint`` reads (``model`` through its tokenizer): a change to any key under them may
change the prepared data (a sweep trial that sets one prepares its own)."""


def fingerprint(cfg: Config, tokenizer: Any, sources: list[ResolvedSource]) -> str:
    """Hash of everything the output depends on: inputs' bytes, tokenizer, template, transforms' knobs, seed."""
    data = dataclasses.asdict(cfg.data)
    for runtime_only in ("num_encoders", "cpus_per_encoder"):
        data.pop(runtime_only)
    data.pop("prune")  # pruning hashes in on top (``with_pruning``): its scores are keyed by the fingerprint without it
    parts: dict[str, Any] = {
        "version": DATA_VERSION,
        "seed": cfg.seed,
        "data": data,
        "mix": dataclasses.asdict(cfg.mix),
        "window_len": cfg.window_len,
        "template": template_hash(tokenizer),
        "vocab": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
        if getattr(tokenizer, "is_fast", False)
        else tokenizer.name_or_path,
        "special": [tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token],
        "sources": [],
    }
    probes = probe_file(cfg.data, cache_dir=cfg.paths.cache_dir) if cfg.data.dedup != "none" else None
    if probes is not None:  # training copies of the probes are dropped: they matter
        parts["probes"] = fingerprint_files((str(probes),))[0][2]
    for src in sources:
        if src.kind == "hub":
            parts["sources"].append([src.paths[0], src.subset, src.split, load_hub_split(src)._fingerprint])
        else:
            parts["sources"].append([src.fmt, src.text_field, [f[1:] for f in fingerprint_files(src.paths)]])
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def with_pruning(fingerprint: str, *, prune: PruneConfig, scores_key: str) -> str:
    """The fingerprint of data pruned by ``prune``: the unpruned ``fingerprint``, the shares, and the scores' key
    (which names the scoring model); its runtime knobs (batch size, scorers, their resources) change nothing."""
    parts = {
        "data": fingerprint,
        "drop_highest": prune.drop_highest,
        "drop_lowest": prune.drop_lowest,
        "scores": scores_key,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
