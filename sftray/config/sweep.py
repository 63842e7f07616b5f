"""The sweep schema: the search space of a Ray Tune sweep and how a trial's config names its keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftray.config.checks import in_range, one_of


@dataclass(kw_only=True)
class LrSpace:
    """Learning rates to try: explicit ``values`` (a grid), or a log-uniform range ``low``..``high``."""

    values: list[float] = field(default_factory=list)
    """Explicit learning rates, tried as a grid; leave empty to sample the range instead (empty and no range: the
    LR is not swept, train.lr or a sweep.points entry sets it)."""
    low: float | None = None
    """Lower end of the log-uniform range (used when values is empty)."""
    high: float | None = None
    """Upper end of the log-uniform range."""


@dataclass(kw_only=True)
class SweepConfig:
    """A Ray Tune sweep: each trial is one training run with some config keys changed."""

    name: str = "demo"
    """Sweep folder and MLflow experiment name (the default sweep: LoRA LR x epochs on the demo)."""
    lr: LrSpace = field(default_factory=lambda: LrSpace(values=[2e-3, 5e-3]))
    """Learning-rate search space (train.lr); the default tries train.lr's default and a lower one."""
    epochs: list[int] = field(default_factory=lambda: [4])
    """train.epochs values, tried as a grid; empty keeps train.epochs. Every epoch of a trial is evaluated and the
    best one selected, so a 4-epoch trial also tries 1, 2 and 3 epochs (under a schedule that decays over 4): one
    epochs value covers the shorter runs too."""
    params: dict[str, list[Any]] = field(default_factory=dict)
    """Any other dotted config key -> values tried as a grid, e.g. {train.lora.r: [8, 16]}."""
    points: list[dict[str, Any]] = field(default_factory=list)
    """One more grid axis whose points each set several keys together, e.g. each method at its own LR:
    [{train.method: lora, train.lr: 5e-3}, {train.method: full, train.lr: 1e-3}]; a trial's config names its
    point as sweep.point (index) beside the keys it set."""
    every_trial: dict[str, Any] | None = field(
        default_factory=lambda: {"train.num_workers": 1, "train.cpus_per_worker": 1.0, "train.micro_batch_size": 8}
    )
    """Dotted config keys every trial sets (not searched); a key set to other than its schema default
    (``train.num_workers=4``) wins over them (``sweep.every_trial=null``: the trials train as ``sftray train`` does). The default is a trial layout for a small
    host: one worker, so the trial trains in its own (reused) process without Ray Train; one CPU, so 2 CPUs hold two
    trials at once; 8-row micro-batches, the same optimizer step as train's default 2 workers x 4 rows."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Replicates: every configuration trains once per seed (train.seed), on the same data, probes and held-out
    windows; the sweep compares configurations over their seeds. [0]: one run per configuration."""
    num_samples: int = 1
    """Repeats of the grid (with a range or random search: draws per grid point)."""
    max_concurrent_trials: int | None = None
    """Trials at once; None: as many as the cluster holds without oversubscription."""
    scheduler: str = "none"
    """none | asha (stops weak trials early on eval/score, per epoch)."""
    search: str = "grid"
    """grid (Tune's basic variant generator) | optuna (tune.choice for grids)."""
    resume: bool = False
    """Resume the sweep of this name: finished trials are kept, unfinished ones rerun."""

    def __post_init__(self) -> None:
        one_of("sweep.scheduler", self.scheduler, ("none", "asha"))
        one_of("sweep.search", self.search, ("grid", "optuna"))
        if not self.lr.values and (self.lr.low is None) != (self.lr.high is None):
            raise ValueError("sweep.lr needs values: [...], both low and high, or neither (LR not swept)")
        for i, lr in enumerate(self.lr.values):
            in_range(f"sweep.lr.values[{i}]", lr, gt=0)
        in_range("sweep.lr.low", self.lr.low, gt=0)
        if self.lr.low is not None:
            in_range("sweep.lr.high", self.lr.high, gt=self.lr.low)
        for i, epochs in enumerate(self.epochs):
            in_range(f"sweep.epochs[{i}]", epochs, ge=1)
        for i, point in enumerate(self.points):
            if not point:
                raise ValueError(f"sweep.points[{i}] sets no key")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"sweep.seeds must list distinct seeds, at least one; got {self.seeds}")
        for i, seed in enumerate(self.seeds):
            in_range(f"sweep.seeds[{i}]", seed, ge=0)
        in_range("sweep.num_samples", self.num_samples, ge=1)
        in_range("sweep.max_concurrent_trials", self.max_concurrent_trials, ge=1)

    def trial_overrides(self, config: dict[str, Any]) -> dict[str, Any]:
        """A Tune trial's config as the config keys it sets: its ``sweep.point`` expanded into that point's keys."""
        flat = {k: v for k, v in config.items() if k != SWEEP_POINT}
        if config.get(SWEEP_POINT) is not None:
            flat.update(self.points[config[SWEEP_POINT]])
        return flat


SEED_KEY = "train.seed"
"""The config key a trial's replicate seed (one of ``sweep.seeds``) sets; configurations are every other swept key."""
SWEEP_POINT = "sweep.point"
"""The Tune config key of a trial's ``sweep.points`` index (not a config key: ``trial_overrides`` expands it)."""
