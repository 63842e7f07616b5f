"""Eval planning on the driver: the probes a run asks, their generation limit, and where its base eval is cached.

The driver builds one ``EvalPlan`` per run (``plan_eval``) and hands it to the workers in their job
(``sftray.train.job.WorkerJob``); the workers' ``Evaluator`` asks what it names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftray.config import Config
from sftray.core.rows import read_rows
from sftray.eval import base_eval
from sftray.eval.probes import (
    extract_answer,
    generation_limit,
    probes_from_file,
    probes_from_rows,
    reference_lengths,
    with_answer_pattern,
)

if TYPE_CHECKING:
    from sftray.data.prepared import Prepared

log = logging.getLogger("sftray.train")

ROW_PROBES_FOR_LIMIT = 256
"""Validation answers that stand in for the references when sizing the generation limit of reference-less probes."""


@dataclass(frozen=True, kw_only=True)
class EvalPlan:
    """What every worker needs to evaluate the run (pickled to each worker in its job)."""

    probes: list[dict] = field(default_factory=list)
    """The generation probes each eval asks (prompt ids, reference, optional format and answer pattern)."""
    max_new_tokens: int = 32
    """Generation limit of the probes (``eval.max_new_tokens``, or sized to their reference answers)."""
    base_eval_path: str | None = None
    """Where the base model's eval is cached (``sftray.eval.base_eval``); None: compute it, cache nothing."""
    earlier_probes: dict[str, tuple[list[dict], int]] = field(default_factory=dict)
    """Multi-stage: each earlier stage's name -> (its probes, their generation limit), scored every eval."""


def plan_eval(
    cfg: Config,
    *,
    prepared: Prepared,
    tokenizer: Any,
    base_model: str,
    heldout_dir: Path,
    adapter: str | None = None,
    earlier_probes: dict[str, tuple[list[dict], int]] | None = None,
) -> EvalPlan:
    """The eval of a run of ``cfg`` from ``base_model`` (``adapter``: a LoRA stage's starting adapter) on
    ``prepared``, measuring forgetting on ``heldout_dir``'s rows; ``earlier_probes``: a later stage's."""
    earlier_probes = earlier_probes or {}
    probes, max_new_tokens = _probes_and_limit(cfg, prepared=prepared, tokenizer=tokenizer)
    key = base_eval.base_eval_key(
        cfg,
        base_model=base_model,
        # another prepared folder's held-out rows: its path (named by its fingerprint) is part of the data
        data_fingerprint=prepared.report["fingerprint"]
        + ("" if heldout_dir == prepared.heldout_dir else f"+{heldout_dir}"),
        probes=probes,
        max_new_tokens=max_new_tokens,
        adapter=adapter,
        earlier_probes=earlier_probes,
    )
    return EvalPlan(
        probes=probes,
        max_new_tokens=max_new_tokens,
        base_eval_path=str(base_eval.cache_path(cfg.paths.output_dir, key)) if cfg.eval.reuse_base_eval else None,
        earlier_probes=earlier_probes,
    )


def eval_probes(cfg: Config, *, prepared: Prepared) -> tuple[list[dict], int]:
    """The generation probes a run of ``cfg`` on ``prepared`` asks, and their generation limit."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    return _probes_and_limit(cfg, prepared=prepared, tokenizer=tokenizer)


def _probes_and_limit(cfg: Config, *, prepared: Prepared, tokenizer: Any) -> tuple[list[dict], int]:
    probes = choose_probes(cfg, prepared=prepared, tokenizer=tokenizer)
    return probes, probe_generation_limit(cfg, probes=probes, prepared=prepared, tokenizer=tokenizer)


def choose_probes(cfg: Config, *, prepared: Prepared, tokenizer: Any) -> list[dict]:
    """The run's generation probes: ``data.probes``, else the last trained turn of validation conversations."""
    n = cfg.eval.num_probes
    if n <= 0:
        return []
    if cfg.data.probes:
        probes = probes_from_file(
            cfg.data,
            cache_dir=cfg.paths.cache_dir,
            tokenizer=tokenizer,
            limit=n,
            answer_pattern=cfg.eval.answer_pattern,
        )
    else:
        rows = read_rows(prepared.val_dir).to_pylist()
        probes = with_answer_pattern(probes_from_rows(rows, tokenizer=tokenizer, limit=n), cfg.eval.answer_pattern)
    if not probes:
        raise ValueError(
            f"eval.num_probes={n} but the validation split of {prepared.out_dir} has no trained assistant turn to "
            "probe; give data.probes or more validation examples (data.val_fraction, data.val_sources)"
        )
    _warn_unanswered(probes, pattern=cfg.eval.answer_pattern)
    return probes


def probe_generation_limit(cfg: Config, *, probes: list[dict], prepared: Prepared, tokenizer: Any) -> int:
    """``max_new_tokens`` of the probes: configured, or sized to their reference answers (warns when out of reach)."""
    e = cfg.eval
    if not probes:
        return e.max_new_tokens or 1
    lengths = reference_lengths(probes, tokenizer=tokenizer)
    if not lengths:  # probes without references: the validation answers' lengths stand in
        rows = read_rows(prepared.val_dir, limit=e.max_eval_rows).to_pylist()
        stand_ins = probes_from_rows(rows, tokenizer=tokenizer, limit=ROW_PROBES_FOR_LIMIT)
        lengths = reference_lengths(stand_ins, tokenizer=tokenizer)
    limit, warning = generation_limit(lengths, configured=e.max_new_tokens, cap=e.max_new_tokens_cap)
    if warning:
        log.warning(warning)
    log.info("%d generation probes, at most %d new tokens each", len(probes), limit)
    return limit


def _warn_unanswered(probes: list[dict], *, pattern: str | None) -> None:
    """Warns when ``eval.answer_pattern`` finds no answer in some probe references (those leave exact match)."""
    references = [p["reference"] for p in probes if p["reference"] is not None]
    unanswered = sum(1 for r in references if extract_answer(r, pattern) is None) if pattern else 0
    if unanswered:
        log.warning(
            "eval.answer_pattern=%r finds no answer in %d of %d probe references: those probes are left out of "
            "eval/exact_match",
            pattern,
            unanswered,
            len(references),
        )
