"""Run-config tables: nested dataclasses to and from TOML tables and Flower's flat keys, with the
type checks that give every bad value a message naming its key (``dp.noise_multiplier``)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from .errors import ConfigError


def norm_key(key: str) -> str:
    """A TOML/CLI key with ``-`` written as ``_``."""
    return key.replace("-", "_")


def normalise_keys(data: Any) -> Any:
    """``data`` with every (nested) key passed through ``norm_key``."""
    if isinstance(data, dict):
        return {norm_key(k): normalise_keys(v) for k, v in data.items()}
    return data


def flatten(data: typing.Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables → ``{"dp.enabled": True}`` (Flower's run-config form)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: typing.Mapping[str, Any]) -> dict[str, Any]:
    """``{"dp.enabled": True}`` → nested tables (the inverse of ``flatten``)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = norm_key(key).split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "mixes a value and a table under the same name")
        node[leaf] = value
    return tree


def build(cls: type, data: typing.Mapping[str, Any], prefix: str) -> Any:
    """The dataclass ``cls`` from nested tables, every key and value checked (ConfigError names the key)."""
    if not isinstance(data, typing.Mapping):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = norm_key(raw_key)
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(prefix + key, f"is not a known setting{hint}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            kwargs[key] = build(hint_type, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(prefix + key, value, hint_type)
    return cls(**kwargs)


def check_types(obj: Any, prefix: str) -> None:
    """Check every field of the dataclass ``obj`` (and its nested tables) as ``build`` checks TOML values."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigError(prefix + f.name, f"must be a {hint.__name__}, got {type(value).__name__} {value!r}")
            check_types(value, prefix=f"{prefix}{f.name}.")
        else:
            coerce(prefix + f.name, value, hint)


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return coerce(key, value, options[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        if not -(2**63) <= value < 2**63:  # what Flower's records (and TOML) hold
            raise ConfigError(key, f"must fit in 64 bits, got {value}")
        return value
    if hint in (bool, str) and isinstance(value, hint):
        return value
    raise ConfigError(key, f"must be of type {hint.__name__}, got {type(value).__name__} {value!r}")
