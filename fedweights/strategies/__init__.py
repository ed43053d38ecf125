"""Server strategies: Flower ``flwr.serverapp.strategy.Strategy`` objects chosen by the run config.

``[strategy] name`` (``--strategy``) picks a built-in from ``BUILTINS`` (Flower's own FedAvg,
FedAvgM, FedProx, FedAdam, FedMedian, FedTrimmedAvg, Krum, MultiKrum) or loads your own
``package.module:Class``: any subclass of Flower's ``Strategy`` (most easily of ``FedAvg``), so the
same class also runs in a stock Flower ServerApp. See README "Writing a strategy".
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.serverapp.strategy import FedAvg, Strategy

from ..config import RunConfig
from ..errors import ConfigError
from .dp_update_bound import DPUpdateBound
from .registry import BUILTINS, LINEAR_ATTRIBUTE, is_linear, load_strategy_class, make_strategy, strategy_class
from .user_dp import UserLevelDPFedAvg, user_dp_strategy
from .validation import DEFAULT_MAX_MODEL_NORM_RATIO, DEFAULT_MAX_NORM_RATIO, ValidatedStrategy, rejected_updates


def build_strategy(config: RunConfig, buffer_keys: Iterable[str] = ()) -> Strategy:
    """The strategy a run uses: the configured one (DP-FedAvg under ``user_dp``), checked against
    ``--he``, wrapped in update validation on the plaintext path (``buffer_keys``: the model's
    buffers, left out of its update norms; under ``--dp``, with DP-SGD's bound on an update). Under
    ``--he`` it is encrypted FedAvg/FedProx/FedAvgM (or DP-FedAvg with distributed noise), which
    validates the encrypted updates itself."""
    check_he_compatible(config)
    if config.he.enabled:
        from .encrypted import build_encrypted_strategy

        return build_encrypted_strategy(config)
    strategy = user_dp_strategy(config) if config.user_dp.enabled else make_strategy(config)
    return ValidatedStrategy(
        strategy,
        max_norm=config.strategy.max_norm,
        max_norm_ratio=_max_norm_ratio(config),
        max_examples=config.strategy.max_examples,
        max_model_norm_ratio=_max_model_norm_ratio(config),
        buffer_keys=buffer_keys,
        dp_bound=DPUpdateBound.of_run(config) if config.strategy.dp_update_bound else None,
    )


def _max_norm_ratio(config: RunConfig) -> float | None:
    """The median-relative norm bound the plaintext path applies: the configured one (0: none),
    else ``DEFAULT_MAX_NORM_RATIO``; none under user-level DP, whose clipping bounds every update and
    whose guarantee does not cover a screen that depends on the other clients' updates."""
    ratio = config.strategy.max_norm_ratio
    if config.user_dp.enabled or ratio == 0:
        return None
    return DEFAULT_MAX_NORM_RATIO if ratio is None else ratio


def _max_model_norm_ratio(config: RunConfig) -> float | None:
    """The model-relative norm bound the plaintext path applies: the configured one (0: none), else
    ``DEFAULT_MAX_MODEL_NORM_RATIO``, except under DP, where the model is no measure of an honest
    update: user-level DP clips every update, and DP-SGD's noise sets their scale (σ 5, batch 8,
    5 local epochs on digits: honest updates 112–177x the model's norm). A value set explicitly
    applies there too (it depends on no other client's update)."""
    ratio = config.strategy.max_model_norm_ratio
    if ratio == 0 or (ratio is None and (config.user_dp.enabled or config.dp.enabled)):
        return None
    return DEFAULT_MAX_MODEL_NORM_RATIO if ratio is None else ratio


def check_he_compatible(config: RunConfig) -> None:
    """Refuse ``--he`` with a strategy the coordinator cannot run on ciphertexts: one whose
    aggregate is not linear in the updates, or any class of your own (the coordinator can only
    add ciphertexts, so it would not run your ``aggregate_train``)."""
    if not config.he.enabled:
        return
    from .encrypted import HE_STRATEGIES

    for key in ("max_norm", "max_norm_ratio", "max_model_norm_ratio"):
        if getattr(config.strategy, key):
            raise ConfigError(
                f"strategy.{key}", "cannot be checked on encrypted updates (--he); remove it or run without --he"
            )

    name = config.strategy.name
    cls = strategy_class(name)
    if not is_linear(cls):
        raise ConfigError(
            "strategy.name",
            f"is {name!r}, which is not linear in the updates, so it cannot aggregate encrypted updates "
            f"(--he). Use one of {', '.join(HE_STRATEGIES)}, or run without --he",
        )
    if name not in HE_STRATEGIES:
        raise ConfigError(
            "strategy.name",
            f"is {name!r}: under --he the coordinator only adds ciphertexts (encrypted FedAvg), so it cannot run "
            f"your class's aggregate_train even if it is linear ({LINEAR_ATTRIBUTE} = True). Use one of "
            f"{', '.join(HE_STRATEGIES)} with --he, or run your class without --he",
        )


__all__ = [
    "BUILTINS",
    "DEFAULT_MAX_MODEL_NORM_RATIO",
    "DEFAULT_MAX_NORM_RATIO",
    "FedAvg",
    "LINEAR_ATTRIBUTE",
    "Strategy",
    "UserLevelDPFedAvg",
    "ValidatedStrategy",
    "build_strategy",
    "check_he_compatible",
    "is_linear",
    "load_strategy_class",
    "make_strategy",
    "rejected_updates",
]
