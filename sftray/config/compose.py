"""Hydra composition: conf/ + overrides -> a validated ``Config`` (the only place Hydra runs), with the override
forms Hydra lacks rewritten first (keys inside open mappings, stage keys, a source list given one path, inline or
file stages)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from sftray.config.errors import ConfigError, explain_config_error
from sftray.config.keys import open_mappings, source_lists, unknown_key_message, unknown_keys
from sftray.config.root import STAGE_GROUPS, Config


def register_configs() -> None:
    """Registers the schemas so conf/*.yaml are validated against them (unknown keys fail)."""
    from hydra.core.config_store import ConfigStore

    # The root schema types every group below it, so group YAMLs are validated without schemas of their own.
    ConfigStore.instance().store(name="config_schema", node=Config)


def config_dir() -> Path:
    """conf/ beside the package (a source checkout), or $SFTRAY_CONF."""
    env = os.environ.get("SFTRAY_CONF")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"  # sftray/config/ -> repo
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {path}; set SFTRAY_CONF to the folder holding sftray's conf/")
    return path


def compose_config(overrides: list[str], *, conf: Path | None = None, base: Path | None = None) -> Config:
    """conf/ + Hydra overrides -> a validated ``Config`` with absolute paths (relative to ``base`` or cwd)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    register_configs()
    GlobalHydra.instance().clear()
    overrides = _rewritten(overrides)
    try:
        overrides = [_given_stages(o, base=base or Path.cwd()) for o in overrides]
        with initialize_config_dir(config_dir=str(Path(conf or config_dir()).resolve()), version_base="1.3"):
            composed = compose("config", overrides=overrides)
        # Hydra's +key / ++key adds keys the schema lacks, and to_object would drop them silently.
        if unknown := unknown_keys(Config, OmegaConf.to_container(composed)):
            raise ConfigError(unknown_key_message(Config, unknown[0]))
        cfg = OmegaConf.to_object(composed)
    except Exception as exc:  # Hydra/OmegaConf raise several types; all become one readable message
        raise ConfigError(explain_config_error(exc, root=Config)) from exc
    if not isinstance(cfg, Config):
        raise ConfigError(f"conf/config.yaml did not compose to a Config (got {type(cfg).__name__})")
    return cfg.resolved_paths(base or Path.cwd())


def _rewritten(overrides: list[str]) -> list[str]:
    """The override forms Hydra lacks, rewritten into ones it composes (inline and file stages: ``_given_stages``)."""
    # Below an open mapping the rest of a dotted key is one key: +sweep.params.train.lora.r=[8,16] adds the entry
    # "train.lora.r" (Hydra would nest train: {lora: {r: ...}}), as +sweep.params={train.lora.r:[8,16]} does.
    mappings = "|".join(re.escape(m) for m in open_mappings(Config))
    overrides = [re.sub(rf"^(\+*)({mappings})\.([^=]+)=(.*)$", r"\1\2={\3:\4}", o, flags=re.S) for o in overrides]
    # A stage's overrides are open mappings too: stages.1.train.lr=1e-4 sets the key whether or not the stage file
    # set it (Hydra alone would demand +); stage_config then checks it against the schema.
    groups = "|".join(STAGE_GROUPS)
    overrides = [re.sub(rf"^(?!\+)(stages\.\d+\.(?:{groups})\.)", r"++\1", o) for o in overrides]
    # A source list given one plain path (data.sources=/data/x.jsonl) is the list of that one source.
    lists = "|".join(re.escape(k) for k in source_lists(Config))
    overrides = [
        re.sub(rf"^(\+*(?:{lists}))=(?![\[{{'\"]|null$)(.+)$", lambda m: f"{m[1]}=[{{path:{_quoted(m[2])}}}]", o)
        for o in overrides
    ]
    return overrides


def _quoted(text: str) -> str:
    """``text`` as a single-quoted Hydra override string (a path may hold ':' or ',')."""
    return "'" + text.replace("'", "\\'") + "'"


GIVEN_STAGES = "_given"
"""The conf/stages option that an inline ``stages=[...]`` list or a ``stages=<file>.yaml`` becomes."""


def _given_stages(override: str, *, base: Path) -> str:
    """``stages=[{name: chat}, ...]`` (Hydra's list syntax) or ``stages=path/to/my_stages.yaml`` (a file laid out
    like a conf/stages file, or the list alone; relative to ``base``) as a conf/stages option of its own, so it
    composes exactly as a file in conf/stages does (later ``stages.<index>.*`` overrides included); any other
    override is returned as it is."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    match = re.fullmatch(r"stages=(.*)", override, flags=re.S)
    if not match:
        return override
    value = match.group(1).strip()
    if value.startswith("["):
        node: Any = {"stages": OverridesParser.create().parse_override(override).value()}
    elif value.endswith((".yaml", ".yml")):
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise ConfigError(f"stages={value}: no such file ({path}); give a conf/stages name or a stages .yaml file")
        node = OmegaConf.to_container(OmegaConf.load(path))
        node = {"stages": node} if isinstance(node, list) else node
        if not isinstance(node, dict) or not isinstance(node.get("stages"), list):
            raise ConfigError(f"stages={value}: {path} holds no stages list (stages: [{{name: ...}}, ...])")
    else:
        return override
    ConfigStore.instance().store(group="stages", name=GIVEN_STAGES, node=node, package="_global_")
    return f"stages={GIVEN_STAGES}"
