"""What a DP client's rounds will look like, derived from the run config and its data size.

Each client samples its records with probability q = 1 / ceil(n_k / batch_size) per step (Opacus'
Poisson sampler: ``ceil(n_k / batch_size)`` steps per local epoch, expected batch ``n_k·q``).
With ``target_epsilon`` the noise multiplier is calibrated for the whole planned run:
``rounds × local_epochs`` epochs, as if the client took part in every round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

from torch import nn

from ..config import DPConfig, RunConfig
from ..errors import ConfigError, UserError
from .accounting import MAX_NOISE_MULTIPLIER, MAX_STEPS, calibrate_noise, default_delta, epsilon
from .dp_sgd import RoundPlan, choose_grad_sample_mode

DEFAULT_NOISE_MULTIPLIER = 1.0  # used when neither noise_multiplier nor target_epsilon is given


def batches_per_epoch(n_examples: int, batch_size: int) -> int:
    """Steps per local epoch under Opacus' Poisson sampler."""
    return max(1, math.ceil(n_examples / batch_size))


def client_delta(n_examples: int, dp: DPConfig) -> float:
    """The run's δ if set, else :func:`~fedweights.privacy.accounting.default_delta` of n_k."""
    return dp.delta if dp.delta is not None else default_delta(n_examples)


def round_plan(n_examples: int, config: RunConfig, calibrated: float | None = None) -> RoundPlan:
    """One client's per-round DP-SGD plan. For a target ε, σ is ``calibrated`` when the client
    already calibrated it in this run, else calibrated now (cached per process)."""
    if n_examples < 1:
        raise UserError("this client has no training examples; it cannot train with DP")
    batches = batches_per_epoch(n_examples, config.batch_size)
    rate = 1.0 / batches
    steps = batches * config.local_epochs
    dp = config.dp
    if dp.target_epsilon is not None and calibrated is not None:
        sigma = calibrated
    elif dp.target_epsilon is not None:
        sigma = _calibrated(
            dp.target_epsilon, rate, steps * config.rounds, client_delta(n_examples, dp), dp.accountant
        )
    else:
        sigma = dp.noise_multiplier if dp.noise_multiplier is not None else DEFAULT_NOISE_MULTIPLIER
    return RoundPlan(sigma, rate, steps, dp.max_grad_norm, config.batch_size, config.local_epochs, n_examples)


def check_grad_sample_mode(config: RunConfig, model_fn: Callable[[], nn.Module]) -> None:
    """Refuse ``[dp] grad_sample_mode = "fused"`` for a model fused DP-SGD cannot train (UserError),
    before any process starts, instead of every client failing every round. ``model_fn`` is
    called only then."""
    if config.dp.enabled and config.dp.grad_sample_mode == "fused":
        choose_grad_sample_mode(model_fn(), "fused")


@lru_cache(maxsize=32)
def _calibrated(target: float, rate: float, steps: int, delta: float, accountant: str) -> float:
    return calibrate_noise(target, rate, steps, delta, accountant)  # type: ignore[arg-type]


def check_dp_run(config: RunConfig, client_sizes: Sequence[int]) -> None:
    """Refuse, before training, a DP run that cannot work: raise UserError/ConfigError.

    Cheap checks only (no calibration): a target ε no noise level can meet, or a budget that
    even one round of every client would exceed.
    """
    dp = config.dp
    if not dp.enabled:
        return
    first_round: list[float] = []
    for n in sorted(set(client_sizes)):
        if n < 1:
            raise UserError("a client has no training examples; use fewer clients or another partition")
        batches = batches_per_epoch(n, config.batch_size)
        steps = batches * config.local_epochs
        delta = client_delta(n, dp)
        if steps * config.rounds > MAX_STEPS:
            raise UserError(
                f"a client with {n} examples would take {steps * config.rounds:.3g} DP-SGD steps over the run, more "
                f"than the {MAX_STEPS:.0e} fedweights accounts; raise batch_size or lower rounds / local_epochs"
            )
        if dp.target_epsilon is not None:
            total = steps * config.rounds
            if epsilon([(MAX_NOISE_MULTIPLIER, 1.0 / batches, total)], delta, dp.accountant) > dp.target_epsilon:
                raise ConfigError(
                    "dp.target_epsilon",
                    f"of {dp.target_epsilon:g} is unreachable for a client with {n} examples: even noise "
                    f"multiplier {MAX_NOISE_MULTIPLIER:g} spends more over {total} steps (delta {delta:g}). "
                    "Raise it, or lower rounds / local_epochs, or raise batch_size.",
                )
        elif dp.max_epsilon is not None:
            sigma = dp.noise_multiplier or DEFAULT_NOISE_MULTIPLIER
            first_round.append(epsilon([(sigma, 1.0 / batches, steps)], delta, dp.accountant))
    if first_round and min(first_round) > dp.max_epsilon:
        raise ConfigError(
            "dp.max_epsilon",
            f"of {dp.max_epsilon:g} is below what one round costs (epsilon={min(first_round):.4g}); no client "
            "could train. Raise it, or raise dp.noise_multiplier.",
        )
