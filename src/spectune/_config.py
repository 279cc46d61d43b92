"""Reading a YAML config into a pydantic model, the same way for train, compare and study configs.

One place decides how a config file is read, how ``key.path=value`` overrides are
applied and how validation errors are reported (each bad key by its dotted path),
so every command fails on a typo with the same kind of message.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists each bad key by its dotted path."""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.path=value`` pairs (values parsed as YAML) set into a nested config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k, {}), dict):
                raise ConfigError(f"override '{path}': '{k}' is not a section")
            node = node.setdefault(k, {})
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def load_model(cls: type[M], source: str | Path | dict[str, Any], overrides: list[str] | None = None,
               what: str = "config") -> M:
    """Read ``source`` (a YAML file or a dict), apply overrides and validate it as ``cls``."""
    if isinstance(source, dict):
        data, where = copy.deepcopy(source), what
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"{what} file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
        where = str(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a {what} is a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{where} is not a valid {what}:\n  " + "\n  ".join(lines)) from None


def to_yaml(model: BaseModel, **dump: Any) -> str:
    """A config as the YAML a person reads and diffs: JSON-mode values, fields in declaration order."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False, **dump)


def first_difference(old: str, new: str) -> str:
    """The first dotted key (sorted) whose value differs between two YAML configs, as ``key: was X, now Y``."""

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, val in node.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): node}

    a, b = flat(yaml.safe_load(old)), flat(yaml.safe_load(new))
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key}: was {a.get(key)!r}, now {b.get(key)!r}"
    return "formatting only"
