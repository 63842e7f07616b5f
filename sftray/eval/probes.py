r"""Generation probes (pure): which prompts to ask, and whether a response follows the chat format.

A response is *compliant* when it is non-empty, ends with the template's end-of-turn token within the generation
limit, and writes no other control token and no user-turn opener before it (a model that has not learnt the format runs
on, or starts a fake next turn). A probe may also carry a ``format``: a regular expression the whole answer must
match to comply (a response format such as JSON, as the second demo stage teaches). *Exact match* additionally
requires the reference answer: the whole answer, or with ``eval.answer_pattern`` (a regular expression with one
group, e.g. GSM8K's ``#### *(\S+)``) the final answer it extracts from both the response and the reference.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sftray.config import Config, DataConfig
from sftray.data.chat import IGNORE_INDEX
from sftray.data.probe_file import probe_file, probe_records


def probes_from_file(
    data: DataConfig, *, cache_dir: str | Path, tokenizer: Any, limit: int, answer_pattern: str | None = None
) -> list[dict]:
    """The first ``limit`` probes of ``data.probes`` (``sftray.data.probe_file.probe_records``: resolved and read
    with ``data.probe_columns`` and ``data.system_prompt``) with prompt ids; ``answer_pattern``:
    ``eval.answer_pattern``."""
    probes = []
    for record in probe_records(data, cache_dir=cache_dir, limit=limit):
        ids = tokenizer.apply_chat_template(record.messages, tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        probe = {"prompt": record.messages[-1]["content"], "prompt_ids": ids, "reference": record.reference}
        probes.append(probe | ({"format": record.format} if record.format is not None else {}))
    return with_answer_pattern(probes, answer_pattern)


def with_answer_pattern(probes: list[dict], pattern: str | None) -> list[dict]:
    """``probes`` that ``judge`` scores by their final answers (``eval.answer_pattern``); unchanged for None."""
    return [p | {"answer_pattern": pattern} for p in probes] if pattern else probes


def check_probe_file(cfg: Config) -> None:
    """Reads ``data.probes`` as a run will (before Ray starts: a bad line costs no start-up) and checks that
    ``eval.answer_pattern`` finds an answer in at least one reference (else exact match is 0 by construction)."""
    if not cfg.data.probes or cfg.eval.num_probes <= 0:
        return
    path = probe_file(cfg.data, cache_dir=cfg.paths.cache_dir)
    records = probe_records(cfg.data, cache_dir=cfg.paths.cache_dir)
    pattern = cfg.eval.answer_pattern
    references = [r.reference for r in records[: cfg.eval.num_probes] if r.reference is not None]
    if pattern and references and not any(extract_answer(r, pattern) is not None for r in references):
        raise ValueError(
            f"eval.answer_pattern={pattern!r} matches none of the {len(references)} reference answers in {path} "
            f"(the first: {references[0][-80:]!r}); fix the pattern, or set eval.answer_pattern=null to compare "
            "whole answers"
        )


def probes_from_rows(rows: list[dict], *, tokenizer: Any, limit: int) -> list[dict]:
    """Probes from prepared chat rows: each example cut before its last trained span; that span is the reference."""
    probes = []
    for row in rows:
        start = 0
        for n, kind in zip(row["seq_lens"], row["seq_kinds"]):
            ids, labels = list(row["input_ids"][start : start + n]), list(row["labels"][start : start + n])
            start += n
            if kind != 1:
                continue
            trained = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
            if not trained:
                continue
            hi = trained[-1] + 1
            lo = hi - 1
            while lo > 0 and labels[lo - 1] != IGNORE_INDEX:
                lo -= 1
            reference = tokenizer.decode(ids[lo : hi - 1], skip_special_tokens=True)  # without the end-of-turn
            prompt = tokenizer.decode(ids[:lo], skip_special_tokens=False)
            probes.append({"prompt": prompt[-200:], "prompt_ids": ids[:lo], "reference": reference.strip()})
            if len(probes) == limit:
                return probes
    return probes


def judge(
    response_ids: list[int],
    *,
    tokenizer: Any,
    end_of_turn_id: int,
    user_opener: str,
    reference: str | None,
    pattern: str | None = None,
    answer_pattern: str | None = None,
) -> dict[str, Any]:
    """Verdict on one generated continuation (token ids after the prompt); ``pattern``: the probe's format;
    ``answer_pattern``: ``eval.answer_pattern``, so exact match compares the final answers it extracts."""
    ended = end_of_turn_id in response_ids
    body = response_ids[: response_ids.index(end_of_turn_id)] if ended else response_ids
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    text = tokenizer.decode(body, skip_special_tokens=False)
    leaked = any(t in special for t in body) or (bool(user_opener) and user_opener in text)
    compliant = ended and not leaked and bool(text.strip())  # an empty answer follows no format
    compliant = compliant and (pattern is None or re.fullmatch(pattern, text.strip()) is not None)
    verdict = {"response": text, "ended": ended, "role_leak": leaked, "compliant": compliant}
    if answer_pattern is None:
        exact = compliant and reference is not None and _normalise(text) == _normalise(reference)
        return verdict | {"exact_match": exact}
    answer = extract_answer(text, answer_pattern)
    expected = extract_answer(reference, answer_pattern) if reference is not None else None
    exact = compliant and answer is not None and expected is not None and _normalise(answer) == _normalise(expected)
    return verdict | {"exact_match": exact, "answer": answer, "reference_answer": expected}


def extract_answer(text: str, pattern: str) -> str | None:
    """The group of ``pattern``'s last match in ``text`` (the final answer, after any working), or None."""
    matches = list(re.finditer(pattern, text))
    if not matches or matches[-1].group(1) is None:
        return None
    return matches[-1].group(1).strip()


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


GENERATION_PERCENTILE = 95
"""Reference answers whose length sizes the generation limit (a few very long outliers should not set it)."""
GENERATION_SLACK = (1.25, 8)
"""Limit = percentile length x 1.25 + 8 tokens: room for a model that phrases the answer a little longer."""
GENERATION_FALLBACK = 64
"""The limit when no reference answer is known at all."""


def generation_limit(reference_lengths: list[int], *, configured: int | None, cap: int) -> tuple[int, str]:
    """The probes' ``max_new_tokens`` and a warning (empty when none is due).

    ``reference_lengths`` are token counts of the answers the probes expect, end-of-turn included. ``configured``
    (``eval.max_new_tokens``) wins when set; None sizes the limit to the data, at most ``cap``. A probe whose
    reference is longer than the limit can never comply: the warning says how many, since format compliance then
    cannot exceed the rest (with all of them out of reach it is 0 for every checkpoint and selection degenerates).
    """
    import math

    lengths = sorted(reference_lengths)
    if configured is not None:
        limit, source = configured, f"eval.max_new_tokens={configured}"
    elif lengths:
        at = lengths[min(len(lengths) - 1, math.ceil(GENERATION_PERCENTILE / 100 * len(lengths)) - 1)]
        scale, extra = GENERATION_SLACK
        limit = min(cap, math.ceil(at * scale) + extra)
        source = (
            f"the generation limit sized from the reference answers ({limit} tokens, eval.max_new_tokens_cap={cap})"
        )
    else:
        return min(cap, GENERATION_FALLBACK), ""
    out_of_reach = sum(1 for n in lengths if n > limit)
    if not out_of_reach:
        return limit, ""
    return limit, (
        f"{out_of_reach} of {len(lengths)} generation probes have reference answers longer than {source}: they "
        f"cannot comply, so eval/format_compliance is at most {1 - out_of_reach / len(lengths):.0%}; raise "
        "eval.max_new_tokens (or eval.max_new_tokens_cap), or set eval.max_new_tokens=null to size it from the data"
    )


def reference_lengths(probes: list[dict], *, tokenizer: Any) -> list[int]:
    """Token count of each probe's reference answer plus its end-of-turn token (probes without one are skipped)."""
    refs = [p["reference"] for p in probes if p.get("reference")]
    return [len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in refs]
