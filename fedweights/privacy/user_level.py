"""User-level (client-level) privacy accounting for DP-FedAvg (McMahan et al. 2018).

Each round samples every client independently with probability ``q = m / N`` (Poisson) and adds
Gaussian noise of std ``z * S`` to the sum of the clipped updates, so one client's whole data set
changes the released sum by at most ``S``. ``T`` rounds compose into a Poisson-subsampled Gaussian
mechanism, accounted with the same dp-accounting PLD code as DP-SGD (``privacy.accounting``), which
counts the amplification by sampling that Flower's own accountant leaves out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

from ..config import UserDPConfig
from ..errors import UserError
from .accounting import calibrate_noise, epsilon

DEFAULT_NOISE_MULTIPLIER = 1.0


def user_level_epsilon(sample_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε of a DP-FedAvg run at ``delta``: the same PLD accounting as DP-SGD steps
    (:func:`fedweights.privacy.accounting.epsilon`, which checks the inputs; pessimistic, never
    below the truth)."""
    return epsilon([(noise_multiplier, sample_rate, rounds)], delta, "pld")


@lru_cache(maxsize=32)
def noise_for_epsilon(target_epsilon: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Smallest noise multiplier (within 0.1 %) whose run spends at most ``target_epsilon`` at
    ``delta``; :func:`fedweights.privacy.accounting.calibrate_noise` with rounds as steps."""
    return calibrate_noise(target_epsilon, sample_rate, rounds, delta, "pld")


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

