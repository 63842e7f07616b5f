"""Preview: show the first encoded examples with trained tokens marked, exactly as the model will see them."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from sftray.config import Config
from sftray.data.chat import IGNORE_INDEX, encode_chat
from sftray.data.errors import DataError
from sftray.data.formats import to_messages
from sftray.data.sources import canonical_record, iter_source_records, load_hub_split, resolve_source
from sftray.models.loading import load_tokenizer

TRAINED_TTY, MASKED_TTY, RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"
TRAINED_OPEN, TRAINED_CLOSE = "{+", "+}"
"""Plain-text markers around trained spans when colour is off (wdiff style)."""


def render_example(input_ids: list[int], labels: list[int], tokenizer: Any, *, color: bool) -> str:
    """The decoded example with trained spans highlighted (colour) or wrapped in ``{+ ... +}`` (plain)."""
    out = []
    for trained, group in itertools.groupby(zip(input_ids, labels), key=lambda p: p[1] != IGNORE_INDEX):
        text = tokenizer.decode([t for t, _ in group], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if color:
            out.append(f"{TRAINED_TTY if trained else MASKED_TTY}{text}{RESET}")
        else:
            out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
    return "".join(out)


def preview(cfg: Config, *, n: int, out: TextIO, color: bool | None = None) -> int:
    """Prints the first ``n`` conversations of the first training source; returns how many were shown."""

    if color is None:
        color = out.isatty() and not os.environ.get("NO_COLOR")
    cache_dir = Path(cfg.paths.cache_dir)
    tokenizer = load_tokenizer(cfg.model, cache_dir=cache_dir)
    src = resolve_source(cfg.data.sources[0], cache_dir=cache_dir, what="data.sources[0]")
    legend = (
        "trained tokens in green, masked dimmed" if color else f"trained tokens inside {TRAINED_OPEN} {TRAINED_CLOSE}"
    )
    print(f"preview of {src.label} ({src.fmt}); {legend}\n", file=out)
    shown = 0
    for where, fmt, record in itertools.islice(_records(src), n):
        try:
            if isinstance(record, DataError):
                raise record
            messages = to_messages(record, fmt, system_prompt=cfg.data.system_prompt, where=where)
            enc = encode_chat(messages, tokenizer, train_on=cfg.data.train_on, example_id=where)
        except DataError as exc:
            print(f"--- {where}: ERROR ({exc.reason}): {exc}\n", file=out)
            continue
        trained = sum(1 for x in enc["labels"] if x != IGNORE_INDEX)
        print(f"--- {where}: {len(enc['input_ids'])} tokens, {trained} trained", file=out)
        print(render_example(enc["input_ids"], enc["labels"], tokenizer, color=color) + "\n", file=out)
        shown += 1
    return shown


def _records(src: Any) -> Iterator[tuple[str, str, Any]]:
    """(where, format, record) as the pipeline reads them: each file's own format, ``columns``/``roles`` applied."""
    if src.kind == "hub":
        for i, row in enumerate(load_hub_split(src), start=1):
            where = f"{src.paths[0]}[{src.split}] row {i}"
            record = json.loads(json.dumps(row, default=str))
            yield where, src.fmt, canonical_record(src, record, fmt=src.fmt, where=where)
        return
    for path in src.paths:
        for row, fmt, record in iter_source_records(src, path, Path(path).read_bytes()):
            yield f"{path}:{row}", fmt, record
