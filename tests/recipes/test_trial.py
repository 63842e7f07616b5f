"""The sweep's trial body without Ray: which trials prepare their own data, and which data a sweep prepares first."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftray.config import compose_config
from sftray.recipes.trial import data_variants, trial_prepares_own_data

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize(
    ("key", "value"),
    [("seed", 1), ("window_len", 64), ("data.max_seq_len", 256), ("mix.ratio", 0.2), ("model.name_or_path", "m")],
)
def test_a_trial_whose_keys_change_the_data_fingerprint_prepares_its_own_data(key, value):
    # Every key the prepared data's fingerprint reads (sftray.data.fingerprint): a trial that reused the sweep's
    # data would train on data its config does not describe (a seed sweep kept seed 0's split).
    assert trial_prepares_own_data({key: value, "train.lr": 1e-3})


@pytest.mark.parametrize("key", ["train.lr", "train.epochs", "eval.num_probes", "train.lora.r"])
def test_a_trial_that_changes_only_training_keys_reuses_the_sweeps_data(key):
    assert not trial_prepares_own_data({key: 1})


def test_data_variants_are_the_distinct_data_keys_of_every_combination():
    """Params and points combine; only data-changing keys count; combinations that differ only in training keys
    share one variant, and a sweep without data keys has none (its trials use the base data)."""
    cfg = compose_config(
        [
            "+sweep.params={data.max_seq_len: [64, 96], train.lora.r: [4, 8]}",
            "sweep.points=[{mix.ratio: 0.1, train.lr: 1e-3}, {mix.ratio: 0.2, train.lr: 2e-3}, {train.lr: 3e-3}]",
            "sweep.lr.values=[]",
        ],
        conf=CONF,
    )
    assert data_variants(cfg) == [
        {"data.max_seq_len": 64, "mix.ratio": 0.1},
        {"data.max_seq_len": 64, "mix.ratio": 0.2},
        {"data.max_seq_len": 64},
        {"data.max_seq_len": 96, "mix.ratio": 0.1},
        {"data.max_seq_len": 96, "mix.ratio": 0.2},
        {"data.max_seq_len": 96},
    ]
    assert data_variants(compose_config(["+sweep.params={train.lora.r: [4, 8]}"], conf=CONF)) == []
