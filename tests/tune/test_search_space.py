"""The sweep's search space and trial resources from config (no Ray running): axes, sweep.points, the errors a
typo gets, and how many trials fit at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftray.config import SEED_KEY, SWEEP_POINT, compose_config
from sftray.tune.session import runs_in_trial
from sftray.tune.sweep import TRIAL_DRIVER_CPUS, search_space, trial_resources, with_every_trial

CONF = Path(__file__).resolve().parents[2] / "conf"


def _cfg(*overrides: str):
    return compose_config(list(overrides), conf=CONF, base=Path("/tmp"))


def _grid(domain) -> list:
    return domain["grid_search"]


def test_the_forgetting_sweep_is_method_by_mix_ratio_with_each_method_at_its_own_lr():
    cfg = _cfg("sweep=forgetting")
    space = search_space(cfg)
    assert set(space) == {"mix.ratio", "train.epochs", SWEEP_POINT, SEED_KEY}  # no LR axis: each point sets its LR
    assert _grid(space["mix.ratio"]) == [0.0, 0.05, 0.2]
    points = [cfg.sweep.trial_overrides({SWEEP_POINT: i}) for i in _grid(space[SWEEP_POINT])]
    assert [p["train.method"] for p in points] == ["lora", "full"]
    assert all(p["train.lr"] > 0 for p in points) and points[0]["train.lr"] != points[1]["train.lr"]


def test_trial_overrides_expand_the_point_and_keep_the_other_keys():
    cfg = _cfg("sweep.lr.values=[]", "sweep.points=[{train.lr: 1e-3, train.lora.r: 4}, {train.lr: 3e-3}]")
    assert cfg.sweep.trial_overrides({SWEEP_POINT: 0, "train.epochs": 2}) == {
        "train.lr": 1e-3,
        "train.lora.r": 4,
        "train.epochs": 2,
    }
    assert cfg.sweep.trial_overrides({"train.epochs": 2}) == {"train.epochs": 2}  # a sweep without points


def test_a_point_key_also_swept_on_its_own_axis_is_an_error_that_says_how_to_fix_it():
    cfg = _cfg("sweep.points=[{train.method: full, train.lr: 1e-3}]")  # sweep.lr.values is still the default grid
    with pytest.raises(ValueError, match=r"sweep.points\[0\] sets train.lr.*sweep.lr.values=\[\]"):
        search_space(cfg)


def test_a_typo_in_a_point_key_lists_the_valid_keys():
    cfg = _cfg("sweep.lr.values=[]", "sweep.points=[{train.lrr: 1e-3}]")
    with pytest.raises(Exception, match=r"lrr.*(valid|lr)"):
        search_space(cfg)


def test_an_empty_point_is_a_config_error():
    with pytest.raises(Exception, match=r"sweep.points\[1\] sets no key"):
        _cfg("sweep.lr.values=[]", "sweep.points=[{train.lr: 1e-3}, {}]")


def test_no_lr_values_and_half_a_range_is_an_error_but_neither_keeps_train_lr():
    assert "train.lr" not in search_space(_cfg("sweep.lr.values=[]"))
    with pytest.raises(Exception, match="both low and high, or neither"):
        _cfg("sweep.lr.values=[]", "sweep.lr.low=1e-4")


@pytest.mark.parametrize(
    ("layout", "cluster", "resources", "at_once"),
    [
        # one worker: the trial process is the worker and holds exactly its CPUs, so two 1-CPU trials share 2 CPUs
        (["train.num_workers=1", "train.cpus_per_worker=1"], {"CPU": 2}, {"CPU": 1.0}, 2),
        (
            ["train.num_workers=1", "train.cpus_per_worker=1", "train.use_gpu=true"],
            {"CPU": 4, "GPU": 1},
            {"CPU": 1.0, "GPU": 1.0},
            1,
        ),
        # several workers: the trial holds a sliver its workers give up, so 2 x 1 CPU still fits 2 CPUs
        (["train.num_workers=2", "train.cpus_per_worker=1"], {"CPU": 2}, {"CPU": TRIAL_DRIVER_CPUS}, 1),
        (["train.num_workers=2", "train.cpus_per_worker=0.5"], {"CPU": 2}, {"CPU": TRIAL_DRIVER_CPUS}, 2),
        (
            ["train.num_workers=1", "train.cpus_per_worker=1", "sweep.max_concurrent_trials=1"],
            {"CPU": 2},
            {"CPU": 1.0},
            1,
        ),
    ],
)
def test_trials_run_side_by_side_as_far_as_their_workers_cpus_fit(layout, cluster, resources, at_once):
    assert trial_resources(_cfg(*layout), cluster=cluster) == (resources, at_once)


def test_a_stage_chain_trial_keeps_its_driver_on_top_of_its_workers():
    cfg = _cfg("train.num_workers=1", "train.cpus_per_worker=1", "stages=demo_two_stage")
    with pytest.raises(ValueError, match=r"one trial needs 1.01 CPUs.*lower train.num_workers"):
        trial_resources(cfg, cluster={"CPU": 1})


def test_the_default_sweeps_trials_train_in_their_own_process_two_at_once_on_two_cpus():
    cfg = _cfg()
    trials = with_every_trial(cfg)
    assert runs_in_trial(trials) and not runs_in_trial(cfg)  # sftray train keeps its own layout
    t, base = trials.train, cfg.train
    assert (
        t.num_workers * t.micro_batch_size * t.grad_accum == base.num_workers * base.micro_batch_size * base.grad_accum
    )
    assert trial_resources(trials, cluster={"CPU": 2}) == ({"CPU": 1.0}, 2)
    assert with_every_trial(_cfg("sweep.every_trial=null", "train.num_workers=2")).train.num_workers == 2


def test_a_typo_in_every_trial_lists_the_valid_keys():
    with pytest.raises(ValueError, match=r"sweep.every_trial.train.num_worker: .*valid keys"):
        with_every_trial(_cfg("+sweep.every_trial={train.num_worker: 1}"))


def test_a_train_key_the_user_sets_wins_over_every_trial(caplog):
    caplog.set_level("INFO", logger="sftray.sweep")
    """make sweep ARGS=train.num_workers=4 must not be silently replaced by the default trial layout."""
    trials = with_every_trial(_cfg("train.num_workers=4"))
    assert trials.train.num_workers == 4
    assert trials.train.micro_batch_size == 8  # the layout's other keys still apply
    assert "sweep.every_trial.train.num_workers=1 is not applied: train.num_workers=4 is set" in caplog.text


def test_seeds_are_a_grid_axis_of_replicates_and_one_seed_is_a_constant():
    assert _grid(search_space(_cfg())[SEED_KEY]) == [0, 1]  # the default sweep: two replicates per configuration
    assert search_space(_cfg("sweep.seeds=[3]"))[SEED_KEY] == 3
    cfg = _cfg("sweep.seeds=[0,1,2]")
    assert cfg.sweep.trial_overrides({"train.lr": 1e-3, SEED_KEY: 2}) == {"train.lr": 1e-3, SEED_KEY: 2}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sweep.seeds=[1,1]"], "sweep.seeds must list distinct seeds"),
        (["sweep.seeds=[]"], "sweep.seeds must list distinct seeds"),
        (["'+sweep.params={train.seed: [0, 1]}'"], "train.seed is swept by sweep.seeds"),
        (["sweep.search=optuna"], "needs sweep.search=grid"),
    ],
)
def test_bad_seeds_fail_with_what_to_do(overrides, message):
    with pytest.raises(ValueError, match=message):
        search_space(_cfg(*[o.strip("'") for o in overrides]))
