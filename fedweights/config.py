"""One run configuration: TOML file + CLI overrides, validated with messages that name the key.

A run config is a tree of dataclasses. In TOML the top-level keys sit at the root and each
section is a table (``[dp]``, ``[he]``); keys may be written with ``-`` or ``_``. On the Flower
side the same tree travels flattened as ``{"rounds": 5, "dp.enabled": true, ...}``
(Flower's run-config format), so ``flwr run --run-config`` can set any key too.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from .errors import ConfigError, UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class DPConfig:
    """Record-level differential privacy (Opacus DP-SGD on every client)."""

    enabled: bool = False
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float | None = None
    accountant: Literal["pld", "rdp"] = "pld"
    max_epsilon: float | None = None
    grad_sample_mode: Literal["auto", "ghost", "hooks"] = "auto"

    def validate(self) -> None:
        """Check the ranges of the DP settings."""
        _positive("dp.noise_multiplier", self.noise_multiplier)
        _positive("dp.target_epsilon", self.target_epsilon)
        _positive("dp.max_grad_norm", self.max_grad_norm)
        _positive("dp.max_epsilon", self.max_epsilon)
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError("dp.delta", f"must be in (0, 1), got {self.delta}")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ConfigError(
                "dp.target_epsilon",
                "and dp.noise_multiplier are exclusive: give one (the other is derived)",
            )
        if self.target_epsilon is not None and self.max_epsilon is not None and self.target_epsilon > self.max_epsilon:
            raise ConfigError(
                "dp.target_epsilon",
                f"={self.target_epsilon:g} exceeds dp.max_epsilon={self.max_epsilon:g}: the budget would stop "
                "the planned run; lower the target or raise the budget",
            )


@dataclass(frozen=True)
class HEConfig:
    """Homomorphically encrypted aggregation (TenSEAL)."""

    enabled: bool = False
    key: str | None = None
    server_key: str | None = None

    def validate(self) -> None:
        """No range checks yet: key files are checked when they are loaded."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated run needs; every field is a TOML key and a CLI option."""

    clients: int = 4
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.1
    momentum: float = 0.9
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: float = 0.5
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dataset: Literal["digits", "fashion-mnist"] = "digits"
    model: Literal["mlp", "cnn"] = "mlp"
    task: str | None = None
    out: str | None = None
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_clients: int | None = None
    round_timeout: float = 600.0
    dp: DPConfig = field(default_factory=DPConfig)
    he: HEConfig = field(default_factory=HEConfig)

    def validate(self) -> None:
        """Check ranges and cross-field rules; raise ConfigError naming the key."""
        for key in ("clients", "rounds", "local_epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        _positive("lr", self.lr)
        _positive("alpha", self.alpha)
        _positive("round_timeout", self.round_timeout)
        if not 0 <= self.momentum < 1:
            raise ConfigError("momentum", f"must be in [0, 1), got {self.momentum}")
        for key in ("fraction_train", "fraction_evaluate"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(key, f"must be in (0, 1], got {getattr(self, key)}")
        if self.min_clients is not None and not 1 <= self.min_clients <= self.clients:
            raise ConfigError(
                "min_clients", f"must be between 1 and clients={self.clients}, got {self.min_clients}"
            )
        if self.task is not None and ":" not in self.task:
            raise ConfigError("task", f"must look like 'package.module:function', got {self.task!r}")
        self.dp.validate()
        self.he.validate()

    @property
    def wait_for_clients(self) -> int:
        """How many connected clients a round waits for before sampling (default: all ``clients``)."""
        return self.min_clients if self.min_clients is not None else self.clients

    @property
    def min_replies(self) -> int:
        """Fewest usable train replies a round needs to be aggregated (default 1)."""
        return self.min_clients if self.min_clients is not None else 1

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Flatten to Flower's run-config form (``dp.enabled`` …); unset (None) keys are left out."""
        return {k: v for k, v in _flatten(dataclasses.asdict(self)).items() if v is not None}

    @classmethod
    def from_flat(cls, flat: typing.Mapping[str, Any]) -> RunConfig:
        """Build from a flat ``{"dp.enabled": True}`` mapping such as Flower's ``context.run_config``."""
        return from_dict(_unflatten(flat))


def from_dict(data: typing.Mapping[str, Any]) -> RunConfig:
    """Build a validated RunConfig from nested dicts (as parsed from TOML)."""
    config = _build(RunConfig, data, prefix="")
    config.validate()
    return config


def load_config(path: str | Path | None = None, overrides: typing.Mapping[str, Any] | None = None) -> RunConfig:
    """Read a TOML run config (optional) and apply flat CLI overrides on top (CLI wins)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    merged = _unflatten(_flatten(_normalise_keys(data)) | {_norm(k): v for k, v in (overrides or {}).items()})
    return from_dict(merged)


# ---------------------------------------------------------------- helpers


def _positive(key: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ConfigError(key, f"must be > 0, got {value}")


def _norm(key: str) -> str:
    return key.replace("-", "_")


def _normalise_keys(data: Any) -> Any:
    if isinstance(data, dict):
        return {_norm(k): _normalise_keys(v) for k, v in data.items()}
    return data


def _flatten(data: typing.Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _unflatten(flat: typing.Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = _norm(key).split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "mixes a value and a table under the same name")
        node[leaf] = value
    return tree


def _build(cls: type, data: typing.Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, typing.Mapping):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = _norm(raw_key)
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(prefix + key, f"is not a known setting{hint}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            kwargs[key] = _build(hint_type, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, value, hint_type)
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, options[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (bool, str) and isinstance(value, hint):
        return value
    raise ConfigError(key, f"must be of type {hint.__name__}, got {type(value).__name__} {value!r}")
