"""Dotted config keys (``train.lora.r``, ``stages.1.train.lr``): setting one on a config, the valid keys at a path of
a schema, the keys a composed tree adds that the schema lacks, and the paths of its open mappings and source lists.

Each function takes the schema it walks (the root ``Config`` in practice), so the root can check itself with them.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from sftray.config.data import SourceConfig


def override(cfg: Any, dotted: str, value: Any) -> Any:
    """A copy of ``cfg`` with the dotted key set (``train.lora.r``, ``stages.1.train.lr``: list items by index,
    keys inside open mappings nested); unknown keys list the valid ones."""
    head, _, rest = dotted.partition(".")
    if isinstance(cfg, list):
        if not head.isdigit() or int(head) >= len(cfg):
            raise ValueError(f"config key part '{head}' of '{dotted}' is not an index below {len(cfg)}")
        items = list(cfg)
        items[int(head)] = override(items[int(head)], rest, value) if rest else value
        return items
    if isinstance(cfg, dict):
        inner = cfg.get(head, {})
        return {**cfg, head: override(inner if isinstance(inner, dict) else {}, rest, value) if rest else value}
    fields = {f.name for f in dataclasses.fields(cfg)}
    if head not in fields:
        raise ValueError(f"unknown config key '{dotted}'; valid keys here: {', '.join(sorted(fields))}")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    child = getattr(cfg, head)
    if not (dataclasses.is_dataclass(child) or isinstance(child, list | dict)):
        raise ValueError(f"config key '{head}' has no sub-keys (asked for '{dotted}')")
    return dataclasses.replace(cfg, **{head: override(child, rest, value)})


def keys_at(root: Any, path: str) -> list[str] | None:
    """Valid keys at a dotted path of the schema ``root`` (``"data"`` -> DataConfig's fields), or None if there is
    none."""
    node: Any = root
    for part in [p for p in path.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return None
        node = _field_type(node, part)
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else None


def unknown_keys(root: Any, tree: dict[str, Any], path: str = "") -> list[str]:
    """Dotted keys of a composed config (plain dicts and lists) that the schema lacks, such as ``train.lrr`` added
    with Hydra's ``+``; below an open mapping (a dict field, e.g. ``sweep.params``) the keys are the user's own."""
    valid = keys_at(root, path)
    if valid is None:
        return []
    out = []
    for key, value in tree.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in valid:
            out.append(full)
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                out += unknown_keys(root, item, full)
    return out


def unknown_key_message(root: Any, key: str) -> str:
    """The error for a key the schema lacks: ``unknown config key 'train.lrr'. Valid keys of train: method, ...``."""
    parent = re.sub(r"\[\d+\]", "", key).rpartition(".")[0]
    valid = ", ".join(keys_at(root, parent) or [])
    return f"unknown config key '{key}'. Valid keys of {parent or 'the root'}: {valid}"


def open_mappings(cls: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the dict fields outside lists (``sweep.params``): Hydra's ``+key=value`` may add keys there."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if typing.get_origin(hints[f.name]) is dict:
            out.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            out += open_mappings(hints[f.name], f"{prefix}{f.name}.")
    return out


def source_lists(cls: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the ``list[SourceConfig]`` fields (``data.sources``, ``mix.sources``, ...)."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if hints[f.name] == list[SourceConfig]:
            out.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            out += source_lists(hints[f.name], f"{prefix}{f.name}.")
    return out


def _field_type(cls: Any, name: str) -> Any:
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list and args:
        return args[0]
    return hint
