"""The sweep's trial body without Ray: which trials prepare their own data."""

from __future__ import annotations

import pytest

from sftray.recipes.trial import trial_prepares_own_data


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
