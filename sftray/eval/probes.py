"""Generation probes (pure): which prompts to ask, and whether a response follows the chat format.

A response is *compliant* when it is non-empty, ends with the template's end-of-turn token within the generation
limit, and writes no other control token and no user-turn opener before it (a model that has not learnt the format runs
on, or starts a fake next turn). A probe may also carry a ``format``: a regular expression the whole answer must
match to comply (a response format such as JSON, as the second demo stage teaches). *Exact match* additionally
requires the reference answer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sftray.data.chat import IGNORE_INDEX


def probes_from_file(path: Path, *, tokenizer: Any, system_prompt: str | None, limit: int) -> list[dict]:
    """``{"prompt", "reference"}`` lines (or ``{"messages": [...], "reference"}``; optional ``format``, a regular
    expression a compliant answer matches) -> probes with prompt ids."""
    probes = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        if "messages" in item:
            messages = item["messages"]
        elif isinstance(item.get("prompt"), str):
            messages = [{"role": "user", "content": item["prompt"]}]
        else:
            raise ValueError(f"{path}:{lineno}: a probe needs 'prompt' (string) or 'messages'")
        if system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        pattern = item.get("format")
        if pattern is not None:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: 'format' is not a regular expression ({exc})") from exc
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        probe = {"prompt": messages[-1]["content"], "prompt_ids": ids, "reference": item.get("reference")}
        probes.append(probe | ({"format": pattern} if pattern is not None else {}))
        if len(probes) == limit:
            break
    if not probes:
        raise ValueError(f"{path}: no probes")
    return probes


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
) -> dict[str, Any]:
    """Verdict on one generated continuation (token ids after the prompt); ``pattern``: the probe's format."""
    ended = end_of_turn_id in response_ids
    body = response_ids[: response_ids.index(end_of_turn_id)] if ended else response_ids
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    text = tokenizer.decode(body, skip_special_tokens=False)
    leaked = any(t in special for t in body) or (bool(user_opener) and user_opener in text)
    compliant = ended and not leaked and bool(text.strip())  # an empty answer follows no format
    compliant = compliant and (pattern is None or re.fullmatch(pattern, text.strip()) is not None)
    exact = compliant and reference is not None and _normalise(text) == _normalise(reference)
    return {"response": text, "ended": ended, "role_leak": leaked, "compliant": compliant, "exact_match": exact}


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
