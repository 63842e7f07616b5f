"""Config errors: ``ConfigError``, and the one readable message made of a Hydra / OmegaConf exception chain."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from sftray.config.keys import keys_at, unknown_key_message


class ConfigError(ValueError):
    """A configuration that cannot be composed or fails validation."""


def explain_config_error(exc: BaseException, *, root: Any) -> str:
    """The deepest useful message of a config error, with the valid keys (of the schema ``root``) when a key is
    unknown."""
    chain, e = [], exc
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    message = str(exc).strip()
    if len(chain) > 1 and str(chain[-1]).strip() not in message:
        message = f"{message}\n  cause: {str(chain[-1]).strip()}"
    for err in chain:
        full_key = getattr(err, "full_key", None)
        object_type = getattr(err, "object_type", None)
        parent = re.sub(r"\[\d+\]", "", full_key or "").rpartition(".")[0]
        if (
            full_key
            and "not in" in str(err)
            and dataclasses.is_dataclass(object_type)
            and (keys_at(root, parent) != [f.name for f in dataclasses.fields(object_type)])
        ):
            # Inside a list item, full_key is relative to the item: its own type names the valid keys, and
            # Hydra's outer message names the overridden list.
            valid = [f.name for f in dataclasses.fields(object_type)]
            outer = re.search(r"override '([\w.]+)'", str(exc))
            where = outer.group(1) if outer else object_type.__name__
            return f"unknown config key '{full_key}'. Valid keys of {where}: {', '.join(valid)}"
        if full_key and type(err).__name__ == "ValidationError":
            return f"invalid value for config key '{full_key}': {str(err).splitlines()[0]}"
        if full_key and "missing mandatory value" in str(err):
            return (
                f"config value '{full_key}' is required but not set (??? in conf/); pass {full_key.split('[')[0]}=..."
            )
        if full_key and ("not in struct" in str(err) or "Key '" in str(err)) and keys_at(root, parent) is not None:
            return unknown_key_message(root, full_key)
    if isinstance(chain[-1], ValueError) and len(chain) > 1:
        return f"invalid configuration: {chain[-1]}"
    return message
