"""The root schema: ``Config`` (its groups, paths and stages) and the config each stage of a multi-stage run trains
with, checked to measure forgetting on one held-out text."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftray.config.checks import in_range
from sftray.config.data import DataConfig, MixConfig
from sftray.config.errors import explain_config_error
from sftray.config.keys import keys_at, unknown_key_message, unknown_keys
from sftray.config.sweep import SweepConfig
from sftray.config.tracking import TrackingConfig
from sftray.config.training import EvalConfig, ModelConfig, TrainConfig


@dataclass(kw_only=True)
class PathsConfig:
    """Where things go. Relative paths are resolved against the launch directory by the CLI."""

    output_dir: str = field(default_factory=lambda: os.environ.get("SFTRAY_OUTPUT", "outputs"))
    """Prepared data, runs and the MLflow store ($SFTRAY_OUTPUT; relative: the launch directory)."""
    cache_dir: str = field(default_factory=lambda: os.environ.get("SFTRAY_CACHE", "~/.cache/sftray"))
    """Built offline assets: tiny tokenizer/model, builtin data ($SFTRAY_CACHE)."""


STAGE_GROUPS = ("data", "mix", "train", "eval")
"""The config groups a stage of a multi-stage run may override."""


@dataclass(kw_only=True)
class StageConfig:
    """One stage of a multi-stage run: a name and its overrides of data, mix, train and eval (nested mappings of
    their keys, e.g. ``train: {lr: 1e-3, lora: {r: 8}}``); everything else is the run's own config."""

    name: str = "???"
    """Stage name: its run folder, its MLflow child run and its probe metrics (eval/<name>/format_compliance)."""
    data: dict[str, Any] = field(default_factory=dict)
    """Overrides of data (its sources, probes, ...)."""
    mix: dict[str, Any] = field(default_factory=dict)
    """Overrides of mix."""
    train: dict[str, Any] = field(default_factory=dict)
    """Overrides of train (lr, epochs, method, lora.between_stages, ...)."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Overrides of eval."""


@dataclass(kw_only=True)
class Config:
    """Root configuration composed from conf/config.yaml."""

    seed: int = 0
    """Seed of every shuffle and split."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    stages: list[StageConfig] = field(default_factory=list)
    """Multi-stage SFT (``conf/stages``): stage k trains from stage k-1's selected checkpoint with this config plus
    its own overrides; empty: one training run."""

    def __post_init__(self) -> None:
        in_range("seed", self.seed, ge=0)
        names = [stage.name for stage in self.stages]
        for i, name in enumerate(names):
            if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)) or names.index(name) != i:
                raise ValueError(f"stages[{i}].name={name!r}: stage names must be unique words ([A-Za-z0-9_-])")
        # an unknown key or a bad value fails here, naming the stage
        _check_one_heldout_text(self, [stage_config(self, i) for i in range(len(self.stages))])

    @property
    def window_len(self) -> int:
        return self.mix.window_len or self.data.max_seq_len

    def resolved_paths(self, base: Path) -> Config:
        """A copy whose paths are absolute (Ray workers and Tune trials run in other directories)."""
        out = Path(self.paths.output_dir).expanduser()
        cache = Path(self.paths.cache_dir).expanduser()
        paths = PathsConfig(
            output_dir=str(out if out.is_absolute() else base / out),
            cache_dir=str(cache if cache.is_absolute() else base / cache),
        )
        return dataclasses.replace(self, paths=paths)


def schema_keys(path: str) -> list[str] | None:
    """Valid keys at a dotted config path (``"data"`` -> DataConfig's fields), or None if there is none."""
    return keys_at(Config, path)


def stage_config(cfg: Config, index: int) -> Config:
    """The config stage ``index`` trains with: ``cfg`` with that stage's overrides merged in (typed and checked
    like the groups themselves), and no stages of its own."""
    from omegaconf import OmegaConf

    stage = cfg.stages[index]
    out = dataclasses.replace(cfg, stages=[])
    for group in STAGE_GROUPS:
        overrides = getattr(stage, group)
        if not overrides:
            continue
        where = f"stages[{index}] ({stage.name}).{group}"
        if unknown := unknown_keys(Config, overrides, group):
            raise ValueError(f"{where}: {unknown_key_message(Config, unknown[0])}")
        error = None
        try:
            merged = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(getattr(cfg, group)), overrides))
        except Exception as exc:  # OmegaConf's type errors and the groups' own range checks
            error = f"{where}: {explain_config_error(exc, root=Config)}"
        if error:  # raised outside the handler: the stage's message, not OmegaConf's, is the deepest one
            raise ValueError(error)
        out = dataclasses.replace(out, **{group: merged})
    return out


def _heldout_keys(cfg: Config, *, other: Config) -> dict[str, tuple[Any, Any]]:
    """The keys that choose the held-out text forgetting is measured on: key -> (value, as shown in an error);
    ``other``: the stage compared with, to name the key that sets the window length."""
    paths = [s.path for s in cfg.mix.heldout_sources]
    keys: dict[str, tuple[Any, Any]] = {
        "mix.heldout_sources": (cfg.mix.heldout_sources, paths),
        "mix.max_heldout_windows": (cfg.mix.max_heldout_windows, cfg.mix.max_heldout_windows),
        "eval.max_eval_rows": (cfg.eval.max_eval_rows, cfg.eval.max_eval_rows),  # the held-out rows an eval reads
    }
    if not cfg.mix.heldout_sources:  # windows held out of mix.sources by hash, cut at the window length
        keys["mix.sources"] = (cfg.mix.sources, [s.path for s in cfg.mix.sources])
        keys["mix.heldout_fraction"] = (cfg.mix.heldout_fraction, cfg.mix.heldout_fraction)
        # the window length, named by the key that sets it here
        window_key = "mix.window_len" if cfg.mix.window_len != other.mix.window_len else "data.max_seq_len"
        keys[window_key] = (cfg.window_len, cfg.mix.window_len or cfg.data.max_seq_len)
    return keys


def _check_one_heldout_text(cfg: Config, stages: list[Config]) -> None:
    """A chain measures forgetting against the original base on one held-out text (every stage reads stage 0's
    held-out windows), so the keys that choose that text must be the same in every stage. Other keys, such as
    data.max_seq_len with mix.heldout_sources given, only pack the text and may differ."""
    if not stages:
        return
    for k, scfg in enumerate(stages[1:], start=1):
        first = _heldout_keys(stages[0], other=scfg)
        for key, (value, shown) in _heldout_keys(scfg, other=stages[0]).items():
            if key not in first or value == first[key][0]:
                continue
            raise ValueError(
                f"stages[{k}] ({cfg.stages[k].name}).{key}={shown} differs from stages[0] ({cfg.stages[0].name}): a"
                f" chain measures forgetting against the original base on one held-out text, so {key} must be the"
                " same in every stage: set it for the whole run, not per stage"
                + (
                    " (with mix.heldout_sources empty, the held-out windows are cut from mix.sources at the window "
                    "length: give mix.heldout_sources, or one mix.window_len for every stage)"
                    if key in ("data.max_seq_len", "mix.window_len")
                    else ""
                )
            )
