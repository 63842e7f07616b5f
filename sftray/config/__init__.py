"""Typed configuration: the dataclass schemas (every default, checked on creation) and ``compose_config``.

The schema is the one home of every default and its documentation (each field's docstring); conf/ group files set
only the values an option changes, with a trailing comment each. ``compose_config`` is the only place Hydra runs:
the CLI, the tests and the bench all get their ``Config`` from it. Library code takes the dataclasses (they pickle
to Ray workers). Modules: checks (value checks), data / training / sweep / tracking (the group schemas), root
(``Config`` and its stages), keys (dotted keys), errors (readable config errors), compose (Hydra).
"""

from sftray.config.compose import compose_config
from sftray.config.data import DEDUP, PROBE_FIELDS, DataConfig, MixConfig, PruneConfig, SourceConfig
from sftray.config.errors import ConfigError
from sftray.config.keys import override
from sftray.config.root import Config, PathsConfig, StageConfig, schema_keys, stage_config
from sftray.config.sweep import SEED_KEY, SWEEP_POINT, LrSpace, SweepConfig
from sftray.config.tracking import LOSS_POINTS_PER_EPOCH, TrackingConfig, WandbConfig
from sftray.config.training import SPECIAL_TOKEN_NAMES, EvalConfig, LoraConfig, ModelConfig, TrainConfig

__all__ = [
    "DEDUP",
    "LOSS_POINTS_PER_EPOCH",
    "PROBE_FIELDS",
    "SPECIAL_TOKEN_NAMES",
    "SEED_KEY",
    "SWEEP_POINT",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoraConfig",
    "LrSpace",
    "MixConfig",
    "ModelConfig",
    "PathsConfig",
    "PruneConfig",
    "SourceConfig",
    "StageConfig",
    "SweepConfig",
    "TrackingConfig",
    "TrainConfig",
    "WandbConfig",
    "compose_config",
    "override",
    "schema_keys",
    "stage_config",
]
