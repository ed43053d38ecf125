"""User-level (client-level) privacy accounting for DP-FedAvg (McMahan et al. 2018).

Each round samples every client independently with probability ``q = m / N`` (Poisson) and adds
Gaussian noise of std ``z * S`` to the sum of the clipped updates, so one client's whole data set
changes the released sum by at most ``S``. ``T`` rounds compose into a Poisson-subsampled Gaussian
mechanism, accounted here with dp-accounting's privacy-loss-distribution (PLD) accountant, which
counts the amplification by sampling that Flower's own accountant leaves out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant

from ..config import UserDPConfig
from ..errors import UserError

DEFAULT_NOISE_MULTIPLIER = 1.0
MIN_NOISE_MULTIPLIER = 0.5  # calibration floor: below it PLDs get slow to compute and the noise is rarely useful


def user_level_event(sample_rate: float, noise_multiplier: float, rounds: int) -> dp_accounting.DpEvent:
    """The DpEvent of ``rounds`` rounds of Poisson-sampled (``sample_rate``) Gaussian (``noise_multiplier``)."""
    round_event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(round_event, rounds)


def user_level_epsilon(sample_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε of a DP-FedAvg run at ``delta`` (PLD accountant; pessimistic discretisation, never below the truth)."""
    _check(sample_rate, rounds, delta)
    if noise_multiplier <= 0:
        raise UserError(f"noise multiplier must be > 0, got {noise_multiplier}")
    if rounds == 0:
        return 0.0
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(user_level_event(sample_rate, noise_multiplier, rounds))
    return float(accountant.get_epsilon(delta))


@lru_cache(maxsize=32)
def noise_for_epsilon(target_epsilon: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Smallest noise multiplier (to 1e-3, at least ``MIN_NOISE_MULTIPLIER``) whose run spends at most
    ``target_epsilon`` at ``delta``: Brent's bisection (dp-accounting) on ``user_level_epsilon``."""
    _check(sample_rate, rounds, delta)
    if target_epsilon <= 0:
        raise UserError(f"target epsilon must be > 0, got {target_epsilon}")

    def over_budget(z: float) -> bool:
        return user_level_epsilon(sample_rate, z, rounds, delta) > target_epsilon

    upper = 1.0
    while over_budget(upper):  # bracket from above first: large noise multipliers are cheap to account
        upper *= 2
    lower = upper / 2
    if upper == 1.0:
        if not over_budget(MIN_NOISE_MULTIPLIER):
            return MIN_NOISE_MULTIPLIER
        lower = MIN_NOISE_MULTIPLIER
    z = dp_accounting.calibrate_dp_mechanism(  # returns a value that meets the budget (non-positive gap)
        pld_privacy_accountant.PLDAccountant,
        lambda noise: user_level_event(sample_rate, noise, rounds),
        target_epsilon,
        delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lower, upper),
        tol=1e-3,
    )
    return float(z)


@dataclass(frozen=True)
class UserLevelGuarantee:
    """The user-level (ε, δ) of a DP-FedAvg run and the settings that produce it."""

    epsilon: float
    delta: float
    noise_multiplier: float
    clipping_norm: float
    sample_rate: float
    rounds: int
    population: int

    def to_dict(self) -> dict[str, float | int]:
        """The ``user_level`` object of a run's privacy report."""
        return asdict(self)


def plan_run(
    population: int,
    clients_per_round: int,
    rounds: int,
    delta: float,
    clipping_norm: float = 1.0,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
) -> UserLevelGuarantee:
    """The guarantee of ``rounds`` rounds with ``clients_per_round`` of ``population`` sampled on average.

    Give ``noise_multiplier`` to get ε, or ``target_epsilon`` to get the noise multiplier; with
    neither, z = 1.
    """
    if not 1 <= clients_per_round <= population:
        raise UserError(f"clients per round must be between 1 and the population {population}, got {clients_per_round}")
    if noise_multiplier is not None and target_epsilon is not None:
        raise UserError("give a noise multiplier or a target epsilon, not both")
    q = clients_per_round / population
    if target_epsilon is not None:
        z = noise_for_epsilon(target_epsilon, q, max(rounds, 1), delta)
    else:
        z = DEFAULT_NOISE_MULTIPLIER if noise_multiplier is None else noise_multiplier
    eps = user_level_epsilon(q, z, rounds, delta)
    return UserLevelGuarantee(eps, delta, z, clipping_norm, q, rounds, population)


@lru_cache(maxsize=8)
def planned_guarantee(user_dp: UserDPConfig, population: int, rounds: int) -> UserLevelGuarantee:
    """The guarantee a run with these ``[user_dp]`` settings has after all ``rounds`` rounds."""
    return plan_run(
        population,
        user_dp.clients_per_round or population,
        rounds,
        user_dp.delta,
        user_dp.clipping_norm,
        user_dp.noise_multiplier,
        user_dp.target_epsilon,
    )


def _check(sample_rate: float, rounds: int, delta: float) -> None:
    if not 0 < sample_rate <= 1:
        raise UserError(f"sample rate must be in (0, 1], got {sample_rate}")
    if rounds < 0:
        raise UserError(f"rounds must be >= 0, got {rounds}")
    if not 0 < delta < 1:
        raise UserError(f"delta must be in (0, 1), got {delta}")
