"""The built-in strategies (Flower's own classes) and loading a user's ``package.module:Class``."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from ..config import RunConfig, StrategyConfig
from ..errors import ConfigError
from .multikrum import PerRoundMultiKrum

LINEAR_ATTRIBUTE = "linear_in_updates"
"""Class attribute a custom strategy sets to True when its aggregate is a linear function of the
updates (a weighted sum), so it can also run on encrypted updates (``--he``)."""


@dataclass(frozen=True)
class BuiltinStrategy:
    """A Flower strategy class, whether it is linear in the updates, and its options from ``[strategy]``."""

    cls: type[Strategy]
    linear: bool
    options: Callable[[StrategyConfig, RunConfig], dict[str, Any]]
    summary: str


def _no_options(_s: StrategyConfig, _c: RunConfig) -> dict[str, Any]:
    return {}


def _multikrum_options(s: StrategyConfig, c: RunConfig) -> dict[str, Any]:
    return {"num_malicious_nodes": s.byzantine, "num_nodes_to_select": s.krum_select}  # None: replies - f


BUILTINS: dict[str, BuiltinStrategy] = {
    "fedavg": BuiltinStrategy(FedAvg, True, _no_options, "example-weighted mean of the updates"),
    "fedavgm": BuiltinStrategy(
        FedAvgM,
        True,
        lambda s, c: {"server_learning_rate": s.server_lr or 1.0, "server_momentum": s.server_momentum},
        "FedAvg with server momentum (strategy.server_lr, strategy.server_momentum)",
    ),
    "fedprox": BuiltinStrategy(
        FedProx,
        True,
        lambda s, c: {"proximal_mu": s.proximal_mu},
        "FedAvg; clients add (mu/2)·||w - w_global||² to their loss (strategy.proximal_mu)",
    ),
    "fedadam": BuiltinStrategy(
        FedAdam,
        False,
        lambda s, c: {"eta": s.server_lr or 0.01, "eta_l": c.lr},
        "Adam on the server over the mean update (strategy.server_lr = eta)",
    ),
    "median": BuiltinStrategy(FedMedian, False, _no_options, "coordinate-wise median"),
    "trimmed-mean": BuiltinStrategy(
        FedTrimmedAvg,
        False,
        lambda s, c: {"beta": s.trim_fraction},
        "coordinate-wise mean without the strategy.trim_fraction largest and smallest values",
    ),
    "krum": BuiltinStrategy(
        Krum,
        False,
        lambda s, c: {"num_malicious_nodes": s.byzantine},
        "the one update closest to its neighbours, tolerating strategy.byzantine attackers",
    ),
    "multi-krum": BuiltinStrategy(
        PerRoundMultiKrum,
        False,
        _multikrum_options,
        "mean of the strategy.krum_select updates with the best Krum scores",
    ),
}


def sampling_options(config: RunConfig) -> dict[str, Any]:
    """The FedAvg-family sampling settings every strategy gets from the run config."""
    return {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_replies,
        "min_evaluate_nodes": config.min_replies,
        "min_available_nodes": config.wait_for_clients,
    }


def strategy_class(name: str) -> type[Strategy]:
    """The class a ``[strategy] name`` stands for: a built-in name or ``package.module:Class``."""
    if name in BUILTINS:
        return BUILTINS[name].cls
    if ":" not in name:
        close = difflib.get_close_matches(name, BUILTINS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            "strategy.name",
            f"{name!r} is not a built-in strategy ({hint}built-ins: {', '.join(BUILTINS)}); "
            "name your own as 'package.module:Class'",
        )
    return load_strategy_class(name)


def load_strategy_class(spec: str) -> type[Strategy]:
    """Import ``package.module:Class`` and check that it is a Flower ``Strategy`` subclass."""
    module_name, _, attr = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        reason = f"={spec!r}: module {module_name!r} cannot be imported ({exc}); is it on PYTHONPATH?"
        raise ConfigError("strategy.name", reason) from None
    except AttributeError:
        raise ConfigError("strategy.name", f"={spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    except Exception as exc:  # the user's module itself fails while importing
        reason = f"={spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        raise ConfigError("strategy.name", reason) from None
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ConfigError(
            "strategy.name",
            f"={spec!r} is {cls!r}, not a subclass of flwr.serverapp.strategy.Strategy "
            "(subclass it, or flwr's FedAvg, to write your own strategy)",
        )
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise ConfigError("strategy.name", f"={spec!r} is abstract: it does not implement {missing}")
    return cls


def is_linear(strategy: Strategy | type[Strategy]) -> bool:
    """Whether the strategy's aggregate is linear in the updates (so it can aggregate ciphertexts).

    Built-ins say so in ``BUILTINS``; any other class opts in with ``linear_in_updates = True``
    (a subclass of a linear built-in that changes the aggregation is not assumed linear).
    """
    cls = strategy if inspect.isclass(strategy) else type(strategy)
    declared = getattr(cls, LINEAR_ATTRIBUTE, None)
    if declared is not None:
        return bool(declared)
    return any(spec.cls is cls and spec.linear for spec in BUILTINS.values())


def make_strategy(config: RunConfig) -> Strategy:
    """Build the strategy ``config.strategy.name`` names, with the run's sampling settings."""
    name = config.strategy.name
    cls = strategy_class(name)
    if name in BUILTINS:
        return cls(**sampling_options(config), **BUILTINS[name].options(config.strategy, config))
    return _instantiate_user_class(name, cls, sampling_options(config))


def _instantiate_user_class(spec: str, cls: type[Strategy], offered: dict[str, Any]) -> Strategy:
    """Call ``cls`` with the offered settings its constructor accepts by name."""
    parameters = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {k: v for k, v in offered.items() if takes_any or k in parameters}
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    required = [n for n, p in parameters.items() if p.default is p.empty and n not in kwargs and p.kind not in variadic]
    if required:
        raise ConfigError(
            "strategy.name",
            f"={spec!r} cannot be built: its constructor needs {', '.join(required)}; give them defaults "
            f"(fedweights passes only {', '.join(offered)})",
        )
    return cls(**kwargs)
