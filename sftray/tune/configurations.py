"""A sweep's configurations: its finished trials grouped by every swept key but the replicate seed, ranked by the
selection rule on their means over seeds, and the verdict of the best against the runner-up
(``sftray.eval.verdict``)."""

from __future__ import annotations

import json
import math
from typing import Any

from sftray.config import SEED_KEY, Config
from sftray.eval.metrics import FORGETTING, FORMAT_COMPLIANCE, VAL_LOSS, rank, select_best
from sftray.eval.outcome import OBJECTIVE
from sftray.eval.verdict import Verdict, compare, configuration_key, labels, summarize
from sftray.train.checkpoint import read_table


def group(trials: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """Finished trials by configuration, in first-seen order: ``overrides`` (without the seed), ``trials`` (their
    rows) and ``runs`` (seed, selected-epoch metrics, probe table) for ``sftray.eval.verdict``."""
    configs: dict[str, dict[str, Any]] = {}
    for row in trials:
        if row["status"] != "finished" or row.get("score") is None:
            continue
        key = configuration_key(row["overrides"], seed_key=SEED_KEY)
        entry = configs.setdefault(
            key, {"overrides": json.loads(key), "display": _display(row["overrides"]), "trials": [], "runs": []}
        )
        entry["trials"].append(row)
        entry["runs"].append(
            {
                "seed": row["overrides"].get(SEED_KEY, cfg.train.training_seed(cfg.seed)),
                "metrics": row["outcome"]["best_metrics"],
                "probes": read_table(row["checkpoint"]) if row.get("checkpoint") else None,
            }
        )
    return list(configs.values())


def rank_configurations(
    trials: list[dict[str, Any]], cfg: Config
) -> tuple[list[dict[str, Any]], str, Verdict | None, str]:
    """(configurations best first, each with its ``summary`` and ``means``; why the first ranks first; the verdict
    of the first against the second, or None; a note when there is nothing to compare)."""
    configs = group(trials, cfg)
    if not configs:
        return [], "", None, "no trial finished"
    e = cfg.eval
    metrics = sorted({e.select_metric, OBJECTIVE, FORGETTING, VAL_LOSS, FORMAT_COMPLIANCE})
    for c in configs:
        c["summary"] = summarize(c["runs"], metrics=metrics)
        c["means"] = {m: v["mean"] for m, v in c["summary"]["metrics"].items()}
    order = rank([c["means"] for c in configs], metric=e.select_metric, forgetting_budget=e.forgetting_budget)
    reason = select_best(
        [c["means"] for c in configs], metric=e.select_metric, forgetting_budget=e.forgetting_budget
    ).reason
    configs = [configs[i] for i in order]
    if len(configs) < 2:
        return configs, reason, None, "one configuration: nothing to compare"
    best = configs[0]
    for other in configs[1:]:  # every configuration against the best: the runner-up's is the verdict
        try:
            other["vs_best"] = compare(
                best["runs"],
                other["runs"],
                metric=e.select_metric,
                labels=labels(best["overrides"], other["overrides"]),
            )
        except ValueError as exc:  # e.g. their finished trials share no seed: no pairs, no verdict, the table stays
            other["vs_best"], other["no_comparison"] = None, str(exc)
    verdict = configs[1]["vs_best"]
    return configs, reason, verdict, "" if verdict else f"no verdict: {configs[1]['no_comparison']}"


def best_trial(config: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """The best configuration's trial (one of its seeds) whose checkpoint the sweep names, by the same rule."""
    e = cfg.eval
    rows = config["trials"]
    choice = select_best(
        [r["outcome"]["best_metrics"] for r in rows], metric=e.select_metric, forgetting_budget=e.forgetting_budget
    )
    return rows[choice.index]


def table(configs: list[dict[str, Any]], cfg: Config) -> str:
    """Configurations best first: seeds, and the selected epochs' metrics as mean [95% interval] over seeds."""
    if not configs:
        return ""
    shown = [cfg.eval.select_metric] + [
        m for m in (FORMAT_COMPLIANCE, FORGETTING, VAL_LOSS) if m != cfg.eval.select_metric
    ]
    lines = ["configurations (selected epochs; mean [95% interval] over seeds):"]
    for rank_, c in enumerate(configs, 1):
        cells = [f"{m.rsplit('/', 1)[-1]} {_interval(m, c['summary']['metrics'][m])}" for m in shown]
        pooled = c["summary"]["pooled"].get(FORMAT_COMPLIANCE)
        if pooled:
            cells.append(
                f"pooled format {pooled['rate']:.1%} [{pooled['lo']:.1%}, {pooled['hi']:.1%}] of {pooled['probes']}"
            )
        if c.get("vs_best"):
            cells.append(c["vs_best"].against_best())
        lines.append(f"  {rank_}. {c['display']}  seeds {c['summary']['seeds']}: " + "; ".join(cells))
    return "\n".join(lines)


def _interval(metric: str, v: dict[str, float]) -> str:
    percent = metric in (FORMAT_COMPLIANCE, FORGETTING) or metric.startswith("eval/") and "loss" not in metric
    f = (lambda x: f"{x:.1%}") if percent else (lambda x: f"{x:.4f}")
    if math.isnan(v["lo"]):
        return f(v["mean"])
    return f"{f(v['mean'])} [{f(v['lo'])}, {f(v['hi'])}]"


def _display(overrides: dict[str, Any]) -> str:
    keys = [k for k in sorted(overrides) if k != SEED_KEY]
    return ", ".join(f"{k}={overrides[k]}" for k in keys) or "(the base config)"
