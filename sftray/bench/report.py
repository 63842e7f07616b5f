"""Bench results: the JSON file (every value of every repeat) and the markdown tables (medians and ratios)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SECTIONS = ("packing", "throughput", "lm_head", "preprocess", "overhead", "sweep", "memory")


def write(results: dict[str, Any], *, out_dir: Path) -> tuple[Path, Path]:
    """Writes ``bench.json`` and ``bench.md`` into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "bench.json", out_dir / "bench.md"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md_path.write_text(markdown(results))
    return json_path, md_path


def markdown(results: dict[str, Any]) -> str:
    """Every section present in ``results`` as a markdown table, headed by the machine and the sizes."""
    meta = results["meta"]
    lines = [
        f"sftray bench, size `{meta['size']}`, median of {meta['repeats']} repeat(s); {meta['machine']['cpu']}, "
        f"{meta['machine']['cpus']} CPUs; torch {meta['versions']['torch']}, transformers "
        f"{meta['versions']['transformers']}, TRL {meta['versions']['trl']}, Ray {meta['versions']['ray']}.",
        "",
    ]
    loaded = meta.get("loaded")
    if loaded:
        peaks = ", ".join(f"{p} {meta['parts'][p]['load_average_max']:.1f}" for p in loaded)
        lines += [
            f"**Loaded run**: the 1-minute load average exceeded the {meta['machine']['cpus']} CPUs during "
            f"{', '.join(loaded)} (peaks: {peaks}); read their timings as upper bounds.",
            "",
        ]
    tables = {
        "packing": _packing,
        "throughput": _throughput,
        "lm_head": _lm_head,
        "preprocess": _preprocess,
        "overhead": _overhead,
        "sweep": _overhead,
        "memory": _memory,
    }
    if results.get("summary"):
        lines += _summary(results["summary"]) + [""]
    for section in SECTIONS:
        if results.get(section):
            lines += tables[section](results[section], meta) + [""]
    return "\n".join(lines)


def _packing(rows: list[dict], meta: dict) -> list[str]:
    columns = sorted({(r["dataset"], r["max_seq_len"]) for r in rows}, key=lambda c: (c[0] != "demo", c[0], c[1]))
    names = list(dict.fromkeys(r["name"] for r in rows))
    cell = {(r["name"], r["dataset"], r["max_seq_len"]): r for r in rows}
    out = [
        "**Packing efficiency**: non-pad share of the positions the model computes on (rows of packing methods: "
        "their fill of max_seq_len in parentheses). Examples longer than max_seq_len dropped for every method.",
        "",
        "| method | " + " | ".join(f"{d} @ {n}" for d, n in columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for name in names:
        cells = []
        for d, n in columns:
            r = cell[(name, d, n)]
            fill = f" ({r['fill']:.1%})" if "pack" in name.lower() and abs(r["fill"] - r["efficiency"]) > 1e-9 else ""
            cells.append(f"{r['efficiency']:.1%}{fill}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("| limit | " + " | ".join("100%" for _ in columns) + " |")
    counts = {(r["dataset"], r["max_seq_len"]): (r["examples"], r["dropped_too_long"]) for r in rows}
    out += [
        "",
        "Examples kept (dropped as too long): "
        + ", ".join(f"{d} @ {n}: {k} ({dropped})" for (d, n), (k, dropped) in counts.items())
        + ".",
    ]
    return out


def _throughput(rows: list[dict], meta: dict) -> list[str]:
    first = rows[0]
    model = meta["size_preset"]["model"]
    out = [
        f"**Training throughput**: full fine-tuning of a random Llama (hidden {model['hidden_size']}, "
        f"{model['num_hidden_layers']} layers, vocab {meta['vocab_size']}), float32, {first['threads']} CPU "
        f"thread(s), max_seq_len {first['max_seq_len']}, one epoch of {first['examples']} demo examples in "
        f"{first['steps']} AdamW steps ({first['tokens']} tokens, {first['target_tokens']} trained, identical for "
        f"every configuration). Ratio: median target tokens/s over TRL's best configuration ({first['trl_best']}).",
        "",
        "| configuration | target tokens/s | tokens/s | computed positions/s | non-pad share | rows/step "
        "| vs TRL best |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r['name']} | {r['target_tokens_per_s']['median']:,.0f} | {r['tokens_per_s']['median']:,.0f} | "
            f"{r['slots_per_s']['median']:,.0f} | {r['efficiency']:.1%} | {r['rows_per_step']} | "
            f"{r['ratio_to_trl_best']:.2f} |"
        )
    return out


def _lm_head(rows: list[dict], meta: dict) -> list[str]:
    first = rows[0]
    out = [
        f"**LM head at target positions**: CPU seconds per training step on the same packed rows ({first['steps']} "
        f"steps of {first['rows_per_step']} x {first['max_seq_len']}, {first['target_share']:.0%} of positions are "
        f"targets), {first['threads']} thread(s), the two heads interleaved over {first['repeats']} pass(es).",
        "",
        "| configuration | CPU s/step (median) | vs every position |",
        "| --- | ---: | ---: |",
    ]
    for r in rows:
        out.append(f"| {r['name']} | {r['median']:.3f} | {rows[0]['median'] / r['median']:.2f}x |")
    return out


def _preprocess(rows: list[dict], meta: dict) -> list[str]:
    out = [
        f"**Preprocessing**: {rows[0]['conversations']} demo conversations (one JSONL file) -> templated, masked, "
        "packed Parquet (tokenizer load included). vs baseline: conversations/s over one `datasets.map` process.",
        "",
        "| pipeline | conversations | conversations/s | seconds | vs baseline |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r['name']} | {r['conversations']:,} | {r['conversations_per_s']['median']:,.0f} | "
            f"{r['seconds']['median']:.1f} | {r['ratio_to_baseline']:.2f} |"
        )
    return out


def _summary(summary: dict[str, float]) -> list[str]:
    out = ["**Summary**", "", "| figure | value |", "| --- | ---: |"]
    out += [f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    return out


def _overhead(rows: list[dict], meta: dict) -> list[str]:
    title = "**Default sweep**" if rows and rows[0]["section"] == "sweep" else "**Ray overhead**"
    out = [f"{title} (measured once)", "", "| figure | value | note |", "| --- | ---: | --- |"]
    for r in rows:
        if r["value"] is None:
            value = "n/a"
        elif r["unit"] == "s":
            value = f"{r['value']:.1f} s"
        elif r["unit"] == "share":
            value = f"{r['value']:.1%}"
        else:
            value = f"{r['value']:,.0f} {r['unit']}"
        out.append(f"| {r['name']} | {value} | {r.get('note', '')} |")
    return out


def _memory(rows: list[dict], meta: dict) -> list[str]:
    shape = rows[0]["batch_shape"]
    out = [
        f"**Memory**: peak RSS of one training process (no Ray runtime), {rows[0]['steps']} steps on "
        f"{shape[0]} x {shape[1]} packed batches.",
        "",
        "| configuration | peak RSS (MiB) | after imports (MiB) | after model load (MiB) | training increment (MiB) "
        "| trainable parameters |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r['name']} | {r['peak_rss_mib']:,.0f} | {r['after_imports_mib']:,.0f} | "
            f"{r['after_model_load_mib']:,.0f} | {r['training_increment_mib']:,.0f} | "
            f"{r['trainable_parameters']:,} of {r['parameters']:,} |"
        )
    return out
