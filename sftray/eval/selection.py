"""Choosing the best checkpoint: a generation metric subject to a forgetting budget, never training loss (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Choice:
    index: int
    """Position of the winner in the candidates."""
    reason: str
    """Why it won, for people."""


def select_best(candidates: Sequence[dict[str, Any]], *, metric: str, forgetting_budget: float) -> Choice:
    """Highest ``metric`` among candidates whose eval/forgetting is within budget (ties: less forgetting, then
    lower val/loss); if none is within budget, the one that forgot least."""
    if not candidates:
        raise ValueError("no candidates to select from (no epoch finished an eval)")
    missing = [k for k in (metric, "eval/forgetting") if k not in candidates[0]]
    if missing:
        raise ValueError(f"candidates lack {missing}; available metrics: {sorted(candidates[0])}")
    feasible = [i for i, c in enumerate(candidates) if c["eval/forgetting"] <= forgetting_budget]
    if feasible:
        best = max(
            feasible,
            key=lambda i: (
                candidates[i][metric],
                -candidates[i]["eval/forgetting"],
                -candidates[i].get("val/loss", 0.0),
            ),
        )
        c = candidates[best]
        return Choice(
            index=best,
            reason=(
                f"highest {metric} ({c[metric]:.3f}) among {len(feasible)} of {len(candidates)} candidates within the "
                f"forgetting budget {forgetting_budget:.0%} (its forgetting: {c['eval/forgetting']:+.1%})"
            ),
        )
    best = min(range(len(candidates)), key=lambda i: candidates[i]["eval/forgetting"])
    c = candidates[best]
    return Choice(
        index=best,
        reason=(
            f"no candidate within the forgetting budget {forgetting_budget:.0%}; least forgetting "
            f"({c['eval/forgetting']:+.1%}, {metric} {c[metric]:.3f})"
        ),
    )
