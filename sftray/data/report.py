"""The data report: what went in, what was dropped and why, and what the training rows hold (JSON + summary)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from sftray.config import Config


def build(
    *,
    cfg: Config,
    sources: list,
    meta: Any,
    wmeta: Any,
    drops: Counter,
    stats: dict[str, dict],
    target_pretrain_tokens: int,
    windows_per_pass: list[int] = (),
    prune: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assembles the report from per-row metadata (pandas) and per-split row statistics; ``windows_per_pass``: the
    pretraining windows the mix took in each pass over the corpus (one pass unless mix.max_repeats allows more);
    ``prune``: the pipeline's pruning section (scoring model, cache, drops per reason, score distribution), None
    when data.prune is off."""
    ok, wok = meta[meta["reason"] == ""], wmeta[wmeta["reason"] == ""]
    per_source = []
    for src in sources:
        m = meta if src.fmt != "text" else wmeta
        rows = m[m["source"] == src.label]
        per_source.append(
            {
                "path": src.label,
                "kind": src.kind,
                "format": src.fmt,
                "formats": sorted(set(src.fmts)),  # a folder of mixed formats detects each file's own
                "files": len(src.paths),
                "ignored_files": list(src.ignored),  # files in a folder source that no reader takes
                "records_in": int(rows["where"].nunique()),
                "records_dropped": int(rows[rows["reason"] != ""]["where"].nunique()),
            }
        )
    _token_shares(per_source, cfg=cfg, meta=meta)
    splits = {name: _split_summary(s) for name, s in stats.items()}
    train = splits["train"]
    train["mix_ratio_target"] = cfg.mix.ratio
    train["mix_ratio_achieved"] = _ratio(stats["train"]["pretrain_tokens"], stats["train"]["tokens"])
    train["pretrain_share_of_trained"] = _ratio(stats["train"]["pretrain_tokens"], stats["train"]["trained_tokens"])
    train["pretrain_tokens_target"] = target_pretrain_tokens
    return {
        "config": {
            "seed": cfg.seed,
            "model": dataclasses.asdict(cfg.model),
            "data": dataclasses.asdict(cfg.data),
            "mix": dataclasses.asdict(cfg.mix),
        },
        "sources": per_source,
        "conversations": {
            "in": int(len(meta)),
            "train": int((ok["split"] == "train").sum()),
            "val": int((ok["split"] == "val").sum()),
            "dropped": int((meta["reason"] != "").sum()),
            "truncated": int(ok["truncated"].sum()),
        },
        "pretraining_windows": {
            "total": int(len(wok)),
            "heldout_pool": int(wok["heldout"].sum()),
            "heldout_used": stats["pretrain_heldout"]["examples"],
            # the mix's passes over the corpus (mix.max_repeats) and the window uses beyond the first pass
            "passes": len(windows_per_pass),
            "windows_used": int(sum(windows_per_pass)),
            "windows_repeated": int(sum(windows_per_pass[1:])),
            # where the forgetting measure's text comes from: text the base never saw, or a hashed share of the mix
            "heldout_from": [s.path for s in cfg.mix.heldout_sources]
            or f"mix.sources, {cfg.mix.heldout_fraction:g} of their windows by hash",
        },
        "drops": dict(sorted(drops.items())),
        "prune": prune,
        "splits": splits,
    }


def _token_shares(per_source: list[dict], *, cfg: Config, meta: Any) -> None:
    """Each training source's share of the SFT tokens in train, next to the share its ``weight`` asks for
    (weight x its tokens after ``max_rows``, over the same for every source). Adds the fields in place."""
    train = meta[(meta["reason"] == "") & (meta["split"] == "train")]
    achieved, target = {}, {}
    for conf, entry in zip(cfg.data.sources, per_source):
        rows = train[train["source"] == entry["path"]]
        achieved[entry["path"]] = int((rows["n_tokens"] * rows["copies"]).sum())
        kept = rows.nsmallest(conf.max_rows, "key") if conf.max_rows else rows
        target[entry["path"]] = conf.weight * int(kept["n_tokens"].sum())
        entry.update(weight=conf.weight, max_rows=conf.max_rows, train_tokens=achieved[entry["path"]])
        entry["train_rows_unused"] = int((rows["copies"] == 0).sum())  # weight < 1 or max_rows: not taken
        entry["train_copies"] = int(rows["copies"].sum())
    for entry in per_source[: len(cfg.data.sources)]:
        entry["token_share"] = _ratio(achieved[entry["path"]], sum(achieved.values()))
        entry["token_share_target"] = _ratio(target[entry["path"]], sum(target.values()))


def summary(report: dict[str, Any]) -> str:
    """A human-readable summary of a report."""
    c, tr = report["conversations"], report["splits"]["train"]
    lines = [
        f"prepared data: {report['out_dir']}",
        f"  fingerprint {report['fingerprint'][:12]}   chat template {report['chat_template_hash']}",
        f"  conversations: {c['in']} in -> {c['train']} train + {c['val']} val; "
        f"{c['dropped']} dropped, {c['truncated']} truncated",
    ]
    if report["drops"]:
        lines.append("  drops by reason: " + ", ".join(f"{k}={v}" for k, v in report["drops"].items()))
    if prune := report.get("prune"):
        scores = prune["scores"]
        lines.append(
            f"  pruning: {prune['scored']} training conversations scored by {prune['model']}"
            f" ({'cached scores' if prune['scores_from_cache'] else 'scored now'}; mean target loss"
            f" {scores.get('mean', float('nan')):.3f}, median {scores.get('quantiles', {}).get('p50', float('nan')):.3f});"
            " dropped " + ", ".join(f"{k}={v}" for k, v in prune["dropped"].items())
        )
    weighted = [s for s in report["sources"] if "token_share" in s and (s["weight"] != 1.0 or s["max_rows"])]
    if weighted:  # weights and max_rows make the trained examples differ from the train conversations
        copies = sum(s["train_copies"] for s in report["sources"] if "train_copies" in s)
        unused = sum(s["train_rows_unused"] for s in report["sources"] if "train_rows_unused" in s)
        extra = copies - (c["train"] - unused)
        lines.append(
            f"  training takes {copies} SFT examples from the {c['train']} train conversations: {unused} unused"
            + (f", {extra} extra copies" if extra else "")
            + " (per-source weight / max_rows)"
        )
    for s in weighted:
        limit = f", max_rows {s['max_rows']}" if s["max_rows"] else ""
        lines.append(
            f"  source {s['path']}: {s['token_share']:.1%} of SFT training tokens (target {s['token_share_target']:.1%}; "
            f"weight {s['weight']:g}{limit})"
        )
    lines.append(f"  {'split':<17}{'rows':>8}{'examples':>10}{'tokens':>11}{'trained':>10}{'packing eff':>13}")
    for name, s in report["splits"].items():
        lines.append(
            f"  {name:<17}{s['rows']:>8}{s['examples']:>10}{s['tokens']:>11}{s['trained_share']:>10.1%}"
            f"{s['packing_efficiency']:>13.1%}"
        )
    if tr["mix_ratio_target"] > 0:
        lines.append(
            f"  pretraining mix: target {tr['mix_ratio_target']:.1%} of training tokens, achieved "
            f"{tr['mix_ratio_achieved']:.2%} ({tr['pretrain_tokens']} tokens; "
            f"{tr['pretrain_share_of_trained']:.1%} of trained tokens)"
        )
    else:
        lines.append("  pretraining mix: off (mix.ratio=0)")
    windows = report["pretraining_windows"]
    if windows.get("passes", 0) > 1:
        lines.append(
            f"  pretraining corpus reused: {windows['passes']} passes (mix.max_repeats="
            f"{report['config']['mix']['max_repeats']}), {windows['windows_repeated']} of {windows['windows_used']}"
            " window uses are repeats"
        )
    return "\n".join(lines)


def _split_summary(s: dict[str, int]) -> dict[str, Any]:
    return {
        **s,
        "packing_efficiency": _ratio(s["tokens"], s["slots"]),
        "trained_share": _ratio(s["trained_tokens"], s["tokens"]),
    }


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else 0.0
