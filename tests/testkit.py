"""Helpers the tests share: JSONL writers, conversation builders and the prep config (one copy each).

Imported as ``from testkit import ...`` (``tests/`` is on pytest's ``pythonpath``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from sftray.config import Config, compose_config

CONF = Path(__file__).resolve().parents[1] / "conf"
"""The repository's Hydra configs."""


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """``rows`` as JSON lines (a string row is written as it is, e.g. a deliberately broken line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def user(content: Any) -> dict:
    return {"role": "user", "content": content}


def assistant(content: Any) -> dict:
    return {"role": "assistant", "content": content}


U, A = user, assistant
"""Short names for tests that spell many conversations turn by turn."""


def chat(prompt: str, answer: str) -> list[dict]:
    """One exchange: a user turn and the assistant's answer."""
    return [user(prompt), assistant(answer)]


def messages_record(prompt: str, answer: str) -> dict:
    """One exchange as a messages-format record."""
    return {"messages": chat(prompt, answer)}


def prep_config(tmp: Path, cache_dir: Path, *overrides: str) -> Config:
    """The repository's config with outputs under ``tmp/out`` and the shared model cache, plus ``overrides``."""
    return compose_config(
        [f"paths.cache_dir={cache_dir}", f"paths.output_dir={tmp / 'out'}", *overrides], conf=CONF, base=tmp
    )


def sft_sequences(prepared: Any) -> Counter:
    """Every packed SFT example of a prepared dataset (train and val), as token tuples, with their counts."""
    from sftray.data.packing import KIND_SFT

    got: Counter = Counter()
    for split in (prepared.train_dir, prepared.val_dir):
        if not any(split.glob("*.parquet")):
            continue
        for row in pq.read_table(split).to_pylist():
            start = 0
            for n, kind in zip(row["seq_lens"], row["seq_kinds"]):
                if kind == KIND_SFT:
                    got[tuple(row["input_ids"][start : start + n])] += 1
                start += n
    return got
