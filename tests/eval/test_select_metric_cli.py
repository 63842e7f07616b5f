"""``eval.select_metric`` is checked when the config is composed, through the CLI, before any data or training."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it


@pytest.mark.parametrize("command", ["config", "train", "sweep"])
def test_a_misspelled_select_metric_fails_at_once_listing_the_valid_ones(command, capsys):
    assert main([command, "eval.select_metric=val/los"]) == 1
    err = capsys.readouterr().err
    assert "eval.select_metric='val/los' is not a metric this run produces" in err
    assert "val/loss (lower is better)" in err and "eval/format_compliance (higher is better)" in err


def test_a_probe_metric_without_probes_fails_and_a_loss_is_accepted(capsys):
    assert main(["config", "eval.num_probes=0"]) == 1  # the default metric is format compliance
    assert "needs generation probes: eval.num_probes > 0" in capsys.readouterr().err
    assert main(["config", "eval.num_probes=0", "eval.select_metric=val/loss"]) == 0
    assert "select_metric: val/loss" in capsys.readouterr().out
