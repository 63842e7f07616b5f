"""Eval metrics: their names, each one's direction, the selection score and the rule that ranks candidates (pure).

A candidate is one eval's metrics (an epoch of a run, or a sweep trial's selected epoch). The rule, used for the
best checkpoint of a run, for the best trial of a sweep and for the analysis notebook's "best first" table:

1. candidates whose ``eval/forgetting`` is within ``eval.forgetting_budget`` come first, best ``eval.select_metric``
   first (in that metric's direction: a loss is better lower, a rate higher);
2. when the metric ties among them, the lower ``val/loss`` (a learning signal) decides, then less forgetting;
3. candidates beyond the budget follow, least forgetting first.

A run's winner is then compared with the base model's eval (its epoch 0) on the metric: a winner worse than the
model before training says so in its reason and ``Choice.worse_than_base`` (the summary and MLflow show it).

``eval/score`` folds the rule into one number that is higher-is-better for every metric (Tune's objective, and
ASHA's): within the budget it is the metric's *goodness* in [0, 1] (a rate as it is, a loss as exp(-loss), i.e.
1/perplexity); beyond the budget it is ``goodness - 1 - forgetting``, below every candidate within it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

VAL_LOSS = "val/loss"
PRETRAIN_LOSS = "eval/pretrain_loss"
BASE_PRETRAIN_LOSS = "eval/base_pretrain_loss"
FORGETTING = "eval/forgetting"
FORMAT_COMPLIANCE = "eval/format_compliance"
EXACT_MATCH = "eval/exact_match"
SCORE = "eval/score"
WITHIN_BUDGET = "eval/within_budget"
ENDED = "eval/ended"
"""Share of generation probes whose response ended (end of turn) within the generation limit."""
BASE_EVAL_REUSED = "eval/base_reused"
"""1 in a run's epoch-0 row when the base model's eval came from the cache (``sftray.eval.base_eval``), else 0."""


def lower_bound(metric: str) -> str:
    """The name of ``metric``'s 95% interval's lower end: ``eval/format_compliance`` -> ``..._lo``."""
    return f"{metric}_lo"


def upper_bound(metric: str) -> str:
    """The name of ``metric``'s 95% interval's upper end (``..._hi``)."""
    return f"{metric}_hi"


def stage_metric(stage: str, metric: str) -> str:
    """An eval metric on an earlier stage's probes in a multi-stage run: ``eval/format_compliance`` of stage
    ``chat`` -> ``eval/chat/format_compliance``."""
    group, _, name = metric.partition("/")
    return f"{group}/{stage}/{name}"


# Train metrics that modules other than the training loop read (the loop computes them).
TRAIN_LOSS = "train/loss"
TRAIN_LOSS_POINTS = "train/loss_points"
"""In an epoch's report: ``[step, loss]`` pairs, the training loss over the steps since the previous pair (every
``tracking.log_every_steps``; the last at the epoch's end). Tracking logs each as ``train/loss`` at its step, in
place of the epoch's ``train/loss``, so a loss curve has several points per epoch without a report per step."""
TRAIN_TOKENS_PER_S = "train/tokens_per_s"
"""Real (non-pad) tokens per second of an epoch's training, from its first micro-batch to its last step."""
TRAIN_TARGET_TOKENS_PER_S = "train/target_tokens_per_s"
"""Trained (label != -100) tokens per second over the same window: what ``make bench`` compares."""
TRAIN_SECONDS = "train/seconds"
"""Seconds of an epoch's training over that window: its optimizer steps (and the input they waited for)."""
EVAL_SECONDS = "eval/seconds"
"""Seconds of an eval (held-out losses, probes); epoch 0's is the base model's (a cache read when reused)."""
TRAIN_INPUT_WAIT = "train/input_wait_s"
"""Seconds of an epoch the loop waited for micro-batches (Ray Data shard, shuffle, collate), first one included."""

MAX, MIN = "max", "min"
DIRECTIONS = {
    VAL_LOSS: MIN,
    PRETRAIN_LOSS: MIN,
    FORGETTING: MIN,
    FORMAT_COMPLIANCE: MAX,
    EXACT_MATCH: MAX,
}
"""Metrics an eval produces that ``eval.select_metric`` may name, and which way is better."""
PROBE_METRICS = (FORMAT_COMPLIANCE, EXACT_MATCH)
"""Produced only when generation probes run (``eval.num_probes > 0``)."""
OBJECTIVE_MODE = MAX
"""Tune's mode for ``eval/score``: the score already carries the selection metric's direction."""
TIE_TOLERANCE = 1e-9


@dataclass(frozen=True, kw_only=True)
class Choice:
    index: int
    """Position of the winner in the candidates."""
    reason: str
    """Why it won, for people: which rule decided (and, when it is, that it is worse than the base model)."""
    worse_than_base: bool = False
    """The winner is worse than the base model (the run's epoch-0 eval) on the selection metric: training made
    the model worse by the measure it was selected on (e.g. a learning rate too high for the task)."""


def direction(metric: str) -> str:
    """``"max"`` or ``"min"``: which way ``metric`` is better."""
    if metric not in DIRECTIONS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(DIRECTIONS)}")
    return DIRECTIONS[metric]


def selectable(*, probes: bool) -> list[str]:
    """The metrics a run produces at every eval, so ``eval.select_metric`` may name them."""
    return [m for m in DIRECTIONS if probes or m not in PROBE_METRICS]


def check_select_metric(metric: str, *, probes: bool) -> None:
    """Fails at config time when the run will not produce ``metric`` (a typo would cost the whole run)."""
    valid = selectable(probes=probes)
    if metric in valid:
        return
    hint = " (it needs generation probes: eval.num_probes > 0)" if metric in PROBE_METRICS else ""
    listed = ", ".join(f"{m} ({'higher' if DIRECTIONS[m] == MAX else 'lower'} is better)" for m in valid)
    raise ValueError(f"eval.select_metric={metric!r} is not a metric this run produces{hint}; valid: {listed}")


def goodness(metric: str, value: float) -> float:
    """``value`` mapped so that higher is better: rates as they are, losses as exp(-loss)."""
    return float(value) if direction(metric) == MAX else math.exp(-float(value))


def score(metrics: dict[str, Any], *, metric: str, forgetting_budget: float) -> float:
    """``eval/score`` of one eval: goodness within the forgetting budget, below every such eval beyond it."""
    value = metrics.get(metric, float("nan"))
    g = goodness(metric, value) if value is not None else float("nan")
    forgetting = metrics[FORGETTING]
    return g if forgetting <= forgetting_budget else g - 1.0 - forgetting


def with_forgetting(metrics: dict[str, float], *, base_pretrain_loss: float, metric: str, budget: float) -> dict:
    """Adds eval/forgetting (relative rise of held-out pretraining loss vs the base) and the selection score."""
    loss = metrics[PRETRAIN_LOSS]
    forgetting = (loss - base_pretrain_loss) / base_pretrain_loss if base_pretrain_loss > 0 else 0.0
    out = {**metrics, BASE_PRETRAIN_LOSS: base_pretrain_loss, FORGETTING: forgetting}
    out[SCORE] = score(out, metric=metric, forgetting_budget=budget)
    out[WITHIN_BUDGET] = float(forgetting <= budget)
    return out


def rank(candidates: Sequence[dict[str, Any]], *, metric: str, forgetting_budget: float) -> list[int]:
    """Indices of ``candidates``, best first, by the rule in the module docstring."""

    def key(i: int) -> tuple:
        c = candidates[i]
        forgetting = _num(c.get(FORGETTING), math.inf)
        g = _num(goodness(metric, c[metric]) if c.get(metric) is not None else None, -math.inf)
        val = _num(c.get(VAL_LOSS), math.inf)
        if forgetting <= forgetting_budget:
            return (0, -g, val, forgetting)
        return (1, forgetting, -g, val)

    return sorted(range(len(candidates)), key=key)


def select_best(
    candidates: Sequence[dict[str, Any]], *, metric: str, forgetting_budget: float, base: dict[str, Any] | None = None
) -> Choice:
    """The best candidate by ``rank``, and which rule decided; ``base``: the base model's eval (a run's epoch 0),
    which the winner is compared with on ``metric`` (``worse_than_base``)."""
    choice = _select(candidates, metric=metric, forgetting_budget=forgetting_budget)
    if base is None or not worse_than_base(candidates[choice.index], base, metric=metric):
        return choice
    chosen, before = candidates[choice.index][metric], base[metric]
    note = f"; worse than the base model on {metric} ({chosen:.3f} vs {before:.3f} before training)"
    return Choice(index=choice.index, reason=choice.reason + note, worse_than_base=True)


def worse_than_base(candidate: dict[str, Any], base: dict[str, Any], *, metric: str) -> bool:
    """``candidate`` is worse than ``base`` on ``metric`` (in its direction; beyond the tie tolerance)."""
    now, before = candidate.get(metric), base.get(metric)
    if now is None or before is None or math.isnan(float(now)) or math.isnan(float(before)):
        return False
    return goodness(metric, now) < goodness(metric, before) - TIE_TOLERANCE


def _select(candidates: Sequence[dict[str, Any]], *, metric: str, forgetting_budget: float) -> Choice:
    if not candidates:
        raise ValueError("no candidates to select from (no epoch finished an eval)")
    missing = [k for k in (metric, FORGETTING) if k not in candidates[0]]
    if missing:
        raise ValueError(f"candidates lack {missing}; available metrics: {sorted(candidates[0])}")
    order = rank(candidates, metric=metric, forgetting_budget=forgetting_budget)
    best = order[0]
    c = candidates[best]
    feasible = [i for i in order if candidates[i][FORGETTING] <= forgetting_budget]
    if not feasible:
        return Choice(
            index=best,
            reason=(
                f"no candidate within the forgetting budget {forgetting_budget:.0%}; least forgetting "
                f"({c[FORGETTING]:+.1%}, {metric} {c[metric]:.3f})"
            ),
        )
    better = "lowest" if direction(metric) == MIN else "highest"
    within = (
        f"among {len(feasible)} of {len(candidates)} candidates within the forgetting budget {forgetting_budget:.0%}"
    )
    tied = [
        i
        for i in feasible
        if abs(goodness(metric, candidates[i][metric]) - goodness(metric, c[metric])) <= TIE_TOLERANCE
    ]
    if len(tied) == 1:
        rule = f"{better} {metric} ({c[metric]:.3f})"
    elif metric != VAL_LOSS and len({_num(candidates[i].get(VAL_LOSS), math.inf) for i in tied}) > 1:
        rule = f"{metric} tied at {c[metric]:.3f} by {len(tied)} candidates; the tie broken by lowest {VAL_LOSS} ({c.get(VAL_LOSS, float('nan')):.4f})"
    else:
        rule = f"{metric} tied at {c[metric]:.3f} by {len(tied)} candidates; the tie broken by least forgetting"
    return Choice(index=best, reason=f"{rule} {within} (its forgetting: {c[FORGETTING]:+.1%})")


def _num(value: Any, default: float) -> float:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return float(value)
