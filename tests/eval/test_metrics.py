"""``sftray.eval.metrics``: directions, the selection score, the ranking rule and the select_metric check (pure)."""

from __future__ import annotations

import math

import pytest

from sftray.eval.metrics import (
    check_select_metric,
    direction,
    rank,
    score,
    select_best,
    selectable,
    with_forgetting,
)


def test_a_loss_is_selected_lowest_not_highest():
    epochs = [
        {"val/loss": 2.0, "eval/forgetting": 0.01},
        {"val/loss": 1.5, "eval/forgetting": 0.02},  # the best epoch by val/loss
        {"val/loss": 3.0, "eval/forgetting": 0.00},
    ]
    choice = select_best(epochs, metric="val/loss", forgetting_budget=0.25)
    assert choice.index == 1
    assert "lowest val/loss (1.500)" in choice.reason
    assert direction("val/loss") == "min" and direction("eval/format_compliance") == "max"


def test_score_is_higher_is_better_for_every_metric_and_sinks_beyond_the_budget():
    low, high = {"val/loss": 1.0, "eval/forgetting": 0.0}, {"val/loss": 4.0, "eval/forgetting": 0.0}
    assert score(low, metric="val/loss", forgetting_budget=0.1) > score(high, metric="val/loss", forgetting_budget=0.1)
    assert score(low, metric="val/loss", forgetting_budget=0.1) == pytest.approx(math.exp(-1.0))
    # Beyond the budget: below every candidate within it, even one with a far worse metric.
    over = {"val/loss": 0.1, "eval/forgetting": 0.5}
    assert score(over, metric="val/loss", forgetting_budget=0.1) < score(high, metric="val/loss", forgetting_budget=0.1)
    rate_over = {"eval/format_compliance": 1.0, "eval/forgetting": 0.3}
    rate_within = {"eval/format_compliance": 0.0, "eval/forgetting": 0.1}
    assert score(rate_over, metric="eval/format_compliance", forgetting_budget=0.2) < score(
        rate_within, metric="eval/format_compliance", forgetting_budget=0.2
    )


def test_with_forgetting_adds_the_relative_rise_and_the_score():
    out = with_forgetting(
        {"eval/pretrain_loss": 3.3, "val/loss": 2.0}, base_pretrain_loss=3.0, metric="val/loss", budget=0.2
    )
    assert out["eval/forgetting"] == pytest.approx(0.1)
    assert out["eval/score"] == pytest.approx(math.exp(-2.0)) and out["eval/within_budget"] == 1.0


def test_a_tied_metric_is_broken_by_val_loss_not_by_forgetting_and_the_reason_says_so():
    # Answers too long for the generation limit: compliance is 0 for every trial. The trial that learnt the most
    # (lowest val/loss) must win, not the one that learnt least and so forgot least.
    trials = [
        {"eval/format_compliance": 0.0, "eval/forgetting": 0.01, "val/loss": 6.71},
        {"eval/format_compliance": 0.0, "eval/forgetting": 0.08, "val/loss": 4.85},
    ]
    choice = select_best(trials, metric="eval/format_compliance", forgetting_budget=0.25)
    assert choice.index == 1
    assert "tied at 0.000 by 2 candidates" in choice.reason and "lowest val/loss (4.8500)" in choice.reason


def test_rank_puts_the_budget_first_then_least_forgetting():
    candidates = [
        {"eval/format_compliance": 0.9, "eval/forgetting": 0.40, "val/loss": 1.0},
        {"eval/format_compliance": 0.5, "eval/forgetting": 0.05, "val/loss": 1.2},
        {"eval/format_compliance": 0.8, "eval/forgetting": 0.30, "val/loss": 1.1},
        {"eval/format_compliance": 0.7, "eval/forgetting": 0.10, "val/loss": 1.3},
    ]
    assert rank(candidates, metric="eval/format_compliance", forgetting_budget=0.2) == [3, 1, 2, 0]
    choice = select_best([candidates[0], candidates[2]], metric="eval/format_compliance", forgetting_budget=0.2)
    assert choice.index == 1 and "no candidate within" in choice.reason


def test_select_metric_is_checked_against_what_the_run_produces():
    check_select_metric("val/loss", probes=False)
    check_select_metric("eval/format_compliance", probes=True)
    with pytest.raises(ValueError, match=r"eval.select_metric='val/los' is not a metric.*val/loss \(lower is better\)"):
        check_select_metric("val/los", probes=True)
    with pytest.raises(ValueError, match=r"needs generation probes: eval.num_probes > 0"):
        check_select_metric("eval/format_compliance", probes=False)
    assert "eval/exact_match" not in selectable(probes=False)


def test_select_best_prefers_the_metric_within_the_forgetting_budget():
    epochs = [
        {"eval/format_compliance": 0.9, "eval/forgetting": 0.40, "val/loss": 1.0},  # best metric, forgot too much
        {"eval/format_compliance": 0.7, "eval/forgetting": 0.05, "val/loss": 1.2},  # tie: lower val/loss wins
        {"eval/format_compliance": 0.7, "eval/forgetting": 0.02, "val/loss": 1.3},
    ]
    choice = select_best(epochs, metric="eval/format_compliance", forgetting_budget=0.1)
    assert choice.index == 1 and "within the forgetting budget" in choice.reason
    choice = select_best(epochs[:1], metric="eval/format_compliance", forgetting_budget=0.1)
    assert choice.index == 0 and "no candidate within" in choice.reason
    with pytest.raises(ValueError, match="available metrics"):
        select_best([{"val/loss": 1.0}], metric="eval/format_compliance", forgetting_budget=0.1)


def test_a_choice_worse_than_the_base_model_says_so():
    base = {"epoch": 0, "eval/format_compliance": 0.141, "eval/forgetting": 0.0, "val/loss": 2.0}
    epochs = [{"eval/format_compliance": 0.0, "eval/forgetting": 0.01, "val/loss": 1.5}]
    choice = select_best(epochs, metric="eval/format_compliance", forgetting_budget=0.05, base=base)
    assert choice.worse_than_base
    assert choice.reason.endswith(
        "; worse than the base model on eval/format_compliance (0.000 vs 0.141 before training)"
    ), choice.reason
    better = [{"eval/format_compliance": 0.5, "eval/forgetting": 0.01, "val/loss": 1.5}]
    choice = select_best(better, metric="eval/format_compliance", forgetting_budget=0.05, base=base)
    assert not choice.worse_than_base and "base model" not in choice.reason
    # A loss is worse when higher; an equal value is not worse.
    losses = [{"val/loss": 2.5, "eval/forgetting": 0.0}, {"val/loss": 2.0, "eval/forgetting": 0.0}]
    choice = select_best(losses[:1], metric="val/loss", forgetting_budget=0.05, base=base)
    assert choice.worse_than_base and "(2.500 vs 2.000 before training)" in choice.reason
    assert not select_best(losses[1:], metric="val/loss", forgetting_budget=0.05, base=base).worse_than_base
    assert not select_best(losses, metric="val/loss", forgetting_budget=0.05).worse_than_base  # no base: no claim
