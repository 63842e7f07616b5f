"""Preprocessing throughput: conversations/s through templating, masking and packing, Ray Data versus one process.

sftray's pipeline as ``sftray prep`` runs it (``sftray.recipes.prep.prep`` with ``force=True``: read JSONL, render +
mask every conversation in tokenizer actors, pack per key group, write Parquet and the report) runs with 1 and 2
tokenizer actors (1 and 2 cores of tokenization: an actor uses a whole core while busy; each reserves 0.5 logical
CPU, sftray's default, so that the read and pack tasks still fit beside two actors on a 2-CPU cluster). The
baseline does the same work in one process with ``datasets``: read the JSONL, ``Dataset.map`` of ``encode_chat``
(overlong examples dropped), ``pack_examples`` per group of ``data.pack_group_size``, write Parquet. Both load the
tokenizer inside the timed window.

The pipeline always tokenizes a pretraining corpus too (held-out windows that measure forgetting); the bench gives
it a one-paragraph text so that this extra work stays negligible, and no pretraining tokens go into the rows
(``workload.NO_MIX``); the SFT tokens of both sides are checked equal.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from sftray.bench.workload import NO_MIX, SEED, demo_conversations

SECTION = "preprocess"
ACTOR_LAYOUTS = ((1, 0.5), (2, 0.5))
"""(data.num_actors, data.cpus_per_actor) of the pipeline runs. Actors holding every logical CPU would starve the
read tasks upstream of them: the pipeline would wait for ever."""
BASELINE = "datasets.map, 1 process (baseline)"
PRETRAIN_TEXT = (
    "Python is a programming language that lets you work quickly and integrate systems more effectively. "
    "It has efficient high-level data structures and a simple but effective approach to object-oriented "
    "programming. Its elegant syntax and dynamic typing make it an ideal language for scripting and rapid "
    "application development in many areas on most platforms.\n"
)
"""The whole pretraining corpus of the pipeline runs (one held-out window at most)."""


def pipeline_name(*, num_actors: int) -> str:
    """Row name of a pipeline run."""
    return f"sftray Ray Data pipeline, {num_actors} tokenizer actor{'s' if num_actors > 1 else ''}"


def measure_preprocess(
    *, cache_dir: Path, work_dir: Path, conversations: int, max_seq_len: int, repeats: int
) -> list[dict]:
    """Rows for each pipeline layout and the baseline: median conversations/s and the ratio to the baseline.
    Ray must be initialised."""
    from sftray.config import compose_config
    from sftray.recipes.prep import prep

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    chats = work_dir / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in demo_conversations(n=conversations)))
    text = work_dir / "pretrain.txt"
    text.write_text(PRETRAIN_TEXT)

    runs: dict[str, list[float]] = {BASELINE: []}
    counts: dict[str, dict[str, int]] = {}
    for r in range(repeats):
        for actors, cpus in ACTOR_LAYOUTS:
            cfg = compose_config(
                [
                    f"paths.cache_dir={cache_dir}",
                    f"paths.output_dir={work_dir / 'out'}",
                    "data=files",
                    f"data.sources=[{{path:'{chats}'}}]",
                    f"data.max_seq_len={max_seq_len}",
                    "data.val_fraction=0",
                    *NO_MIX,
                    f"mix.sources=[{{path:'{text}'}}]",
                    f"data.num_actors={actors}",
                    f"data.cpus_per_actor={cpus}",
                    f"seed={SEED}",
                ],
                base=work_dir,
            )
            started = time.perf_counter()
            prepared = prep(cfg, force=True)
            seconds = time.perf_counter() - started
            name = pipeline_name(num_actors=actors)
            runs.setdefault(name, []).append(seconds)
            train = prepared.report["splits"]["train"]
            counts[name] = {
                "examples": train["examples"],
                "rows": train["rows"],
                "tokens": train["tokens"] - train["pretrain_tokens"],  # SFT tokens
                "pretrain_tokens": train["pretrain_tokens"],
            }
        started = time.perf_counter()
        counts[BASELINE] = _baseline(  # cfg: the last pipeline run's (same tokenizer, template and data knobs)
            chats=chats, cfg=cfg, out=work_dir / "baseline" / f"repeat-{r}.parquet", max_seq_len=max_seq_len
        )
        runs[BASELINE].append(time.perf_counter() - started)

    for c in counts.values():
        # The same SFT tokens out (overlong examples dropped alike); rows may differ: packing groups differ.
        assert c["tokens"] == counts[BASELINE]["tokens"], counts
    base = statistics.median(conversations / s for s in runs[BASELINE])
    names = [pipeline_name(num_actors=a) for a, _ in ACTOR_LAYOUTS] + [BASELINE]
    rows = []
    for name in names:
        rates = [conversations / s for s in runs[name]]
        rows.append(
            {
                "section": SECTION,
                "name": name,
                "conversations_per_s": {"values": rates, "median": statistics.median(rates), "unit": "conv/s"},
                "seconds": {"values": runs[name], "median": statistics.median(runs[name]), "unit": "s"},
                "ratio_to_baseline": statistics.median(rates) / base,
                "conversations": conversations,
                **counts[name],
            }
        )
    return rows


def _baseline(*, chats: Path, cfg: Any, out: Path, max_seq_len: int) -> dict[str, int]:
    """The same work in one process: datasets.map(encode_chat), drop overlong, pack per group, write Parquet."""
    from datasets import Dataset

    from sftray.data.chat import encode_chat
    from sftray.data.packing import pack_examples
    from sftray.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model, cache_dir=Path(cfg.paths.cache_dir))
    table = Dataset.from_json(str(chats), keep_in_memory=True)

    def encode(example: dict) -> dict:
        enc = encode_chat(example["messages"], tokenizer, train_on=cfg.data.train_on)
        return {**enc, "n_tokens": len(enc["input_ids"])}

    encoded = table.map(encode, remove_columns=table.column_names, keep_in_memory=True, load_from_cache_file=False)
    encoded = encoded.filter(lambda n: n <= max_seq_len, input_columns="n_tokens", keep_in_memory=True)
    examples = encoded.to_list()
    group = cfg.data.pack_group_size
    rows = [
        r
        for i in range(0, len(examples), group)
        for r in pack_examples(examples[i : i + group], max_seq_len=max_seq_len, seed=SEED)
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).to_parquet(str(out))
    tokens = sum(len(r["input_ids"]) for r in rows)
    return {"examples": len(examples), "rows": len(rows), "tokens": tokens, "pretrain_tokens": 0}
