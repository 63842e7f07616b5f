"""Every default lives once: conf/ group files set only values that differ from the typed schema's defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from sftray.config import Config

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUP_FILES = sorted(p for p in CONF.glob("*/*.yaml"))


def _schema_default(path: Path) -> dict:
    if path.read_text().startswith("# @package _global_"):  # the file sets root keys (conf/stages)
        return dataclasses.asdict(Config())
    return dataclasses.asdict(getattr(Config(), path.parent.name))


def _repeats(values: dict, defaults: dict, prefix: str) -> list[str]:
    out = []
    for key, value in values.items():
        if key == "defaults":
            continue
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            out += _repeats(value, default, f"{prefix}{key}.")
        elif value == default:
            out.append(f"{prefix}{key}={value!r}")
    return out


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_group_file_repeats_no_schema_default(path: Path):
    values = yaml.safe_load(path.read_text()) or {}
    repeated = _repeats(values, _schema_default(path), f"{path.parent.name}.")
    assert not repeated, f"{path.relative_to(CONF.parent)} repeats the schema's defaults: {repeated}"


def test_the_root_file_sets_no_value():
    root = yaml.safe_load((CONF / "config.yaml").read_text())
    assert set(root) == {"defaults"}, sorted(root)


def test_the_default_composition_is_the_schema_defaults(monkeypatch, tmp_path):
    from sftray.config import compose_config

    for var in ("SFTRAY_OUTPUT", "SFTRAY_CACHE", "SFTRAY_DATA", "SFTRAY_CONF"):
        monkeypatch.delenv(var, raising=False)
    composed = compose_config([], base=tmp_path)
    schema = Config(model=dataclasses.replace(Config().model, name_or_path="builtin:tiny-llama"))
    assert composed == schema.resolved_paths(tmp_path)  # what tests and the bench build is what users run
