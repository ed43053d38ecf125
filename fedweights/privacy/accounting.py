"""Privacy accounting for DP-SGD: ε of a history of Poisson-subsampled Gaussian steps.

A history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, the form Opacus'
accountants keep. Every ε that fedweights reports, plans or enforces comes from
:func:`epsilon` here, computed with Google's dp-accounting:

* ``pld`` (default): privacy-loss distributions, ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``
  self-composed ``steps`` times, pessimistic estimate, value discretization 1e-4 — the same
  numbers as ``dp_accounting.pld.PLDAccountant`` (tight: within discretization of the truth).
  Where RDP already gives ε > 50 (``PLD_EPSILON_CEILING``: σ of a few tenths or less, or a huge
  number of steps) the RDP bound is reported: an upper bound, so never an under-report.
* ``rdp``: Rényi DP (``dp_accounting.rdp.RdpAccountant``), looser, kept for comparison with
  papers and Opacus' default.

Composition is order-free, so entries with the same (σ, q) are merged before accounting.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Literal

import dp_accounting
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize

from ..errors import UserError

Accountant = Literal["pld", "rdp"]
ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")
Entry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


def as_entries(rows: Iterable[Sequence[float]]) -> list[Entry]:
    """``(σ, q, steps)`` tuples from rows read back from JSON (lists, any number types)."""
    return [(float(s), float(q), int(n)) for s, q, n in rows]

PLD_DISCRETIZATION = 1e-4  # dp-accounting's PLDAccountant default
PLD_EPSILON_CEILING = 50.0
"""Above this RDP ε (no meaningful protection: tiny σ, or a huge number of steps) ``pld`` reports the
RDP bound instead: never lower than the truth, while PLD there takes minutes and gigabytes."""
MAX_NOISE_MULTIPLIER = 1_000.0  # calibration gives up above this (the target is then unreachable)
# Beyond these, a history is refused rather than accounted: no run comes near them (10^8 steps is
# 100 epochs of 10^7 examples at batch 16), PLD's pessimistic rounding then inflates ε by orders of
# magnitude (σ 30, q 0.01, 10^8 steps: 831, where RDP proves < 50) and takes seconds per entry,
# and below q = 1e-12 dp-accounting's floating point no longer sees the mechanism (ε 0).
MAX_STEPS = 10**8
MIN_SAMPLE_RATE = 1e-12
MAX_HISTORY_ENTRIES = 100  # distinct (σ, q) settings; a run has one per σ or shard-size change
DEFAULT_MAX_DELTA = 1e-5
# Equivalent compositions (one entry of 400 steps, or 300 + 100) differ in the last digits of
# floating point; reported ε is raised by this relative margin so it is never below any of them.
ROUNDING_MARGIN = 1e-8


def default_delta(num_examples: int) -> float:
    """δ when none is given: 1/n² rounded down to a power of ten, capped at 1e-5.

    E.g. n=360 → 1/n²≈7.7e-6 → 1e-6; n=100 → 1e-4 → capped to 1e-5; n=60000 → 1e-10.
    """
    if num_examples < 1:
        raise UserError("a client with no training examples cannot train with DP")
    bound = 1.0 / num_examples**2
    exponent = math.floor(math.log10(bound) + 1e-12)
    while 10.0**exponent > bound:  # guard float rounding of log10
        exponent -= 1
    return min(DEFAULT_MAX_DELTA, 10.0**exponent)


def merge_history(history: Iterable[Sequence[float]]) -> list[Entry]:
    """Sum the steps of entries with equal (σ, q), keeping first-seen order; drop zero-step entries.
    Raises UserError for an entry out of range (:func:`check_entry`), a merged entry over
    ``MAX_STEPS``, or more than ``MAX_HISTORY_ENTRIES`` distinct (σ, q)."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:
        check_entry(sigma, rate, steps)
        if int(steps) > 0:
            key = (float(sigma), float(rate))
            merged[key] = merged.get(key, 0) + int(steps)
            check_entry(*key, merged[key])
            if len(merged) > MAX_HISTORY_ENTRIES:
                raise UserError(f"a history with more than {MAX_HISTORY_ENTRIES} distinct (noise multiplier, sample "
                                "rate) settings; fedweights accounts at most that many")
    return [(sigma, rate, steps) for (sigma, rate), steps in merged.items()]


def check_entry(noise_multiplier: float, sample_rate: float, steps: float) -> None:
    """Raise UserError unless 0 < σ ≤ ``MAX_NOISE_MULTIPLIER``, ``MIN_SAMPLE_RATE`` ≤ q ≤ 1 and
    steps is an integer from 0 to ``MAX_STEPS``."""
    if not 0 < noise_multiplier <= MAX_NOISE_MULTIPLIER:
        raise UserError(f"noise multiplier must be > 0 and at most {MAX_NOISE_MULTIPLIER:g}, got {noise_multiplier}")
    if not MIN_SAMPLE_RATE <= sample_rate <= 1:
        raise UserError(f"sample rate must be in [{MIN_SAMPLE_RATE:g}, 1], got {sample_rate}")
    if not 0 <= steps <= MAX_STEPS or int(steps) != steps:
        raise UserError(f"steps must be an integer from 0 to {MAX_STEPS:.0e} per (noise multiplier, sample rate), "
                        f"got {steps}; for longer runs raise the batch size or lower rounds / local epochs")


def check_delta(delta: float) -> None:
    """Raise UserError unless 0 < δ < 1."""
    if not 0 < delta < 1:
        raise UserError(f"delta must be in (0, 1), got {delta}")


def check_accountant(accountant: str) -> None:
    """Raise UserError for an unknown accountant name."""
    if accountant not in ACCOUNTANTS:
        raise UserError(f"unknown accountant {accountant!r}; choose {' or '.join(ACCOUNTANTS)}")


def epsilon(history: Iterable[Sequence[float]], delta: float, accountant: Accountant = "pld") -> float:
    """ε spent by a DP-SGD history at ``delta`` (0 for an empty history)."""
    check_delta(delta)
    check_accountant(accountant)
    return _epsilon_of(tuple(merge_history(history)), delta, accountant)


def covering_history(*histories: Iterable[Sequence[float]]) -> list[Entry]:
    """The smallest history that contains each of ``histories``: per (σ, q), the most steps any
    of them took. Its ε is at least each one's, so merging with it never undercounts."""
    steps: dict[tuple[float, float], int] = {}
    for history in histories:
        for sigma, rate, n in merge_history(history):
            steps[(sigma, rate)] = max(steps.get((sigma, rate), 0), n)
    return [(sigma, rate, n) for (sigma, rate), n in steps.items()]


@lru_cache(maxsize=1024)
def _epsilon_of(entries: tuple[Entry, ...], delta: float, accountant: str) -> float:
    if not entries:
        return 0.0
    value = _rdp_epsilon(entries, delta)
    if accountant == "pld" and value <= PLD_EPSILON_CEILING:
        value = _pld_epsilon(entries, delta)
    return value * (1 + ROUNDING_MARGIN)


def steps_for_epochs(sample_rate: float, epochs: float) -> int:
    """Steps of ``epochs`` passes at sample rate q (one pass is 1/q steps, rounded up)."""
    if not (epochs > 0 and math.isfinite(epochs)):
        raise UserError(f"epochs must be > 0 and finite, got {epochs}")
    return max(1, math.ceil(epochs / sample_rate - 1e-9))


def calibrate_noise(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant = "pld",
    rtol: float = 1e-3,
) -> float:
    """The smallest noise multiplier σ (within ``rtol``) whose run of ``steps`` steps at sample
    rate ``sample_rate`` spends at most ``target_epsilon`` at ``delta``.

    The answer is checked with :func:`epsilon` itself, so it is guaranteed to meet the target
    under the accountant the run reports with. Raises UserError when no σ ≤ 1000 does.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise UserError(f"target epsilon must be > 0 and finite, got {target_epsilon}")
    check_entry(1.0, sample_rate, steps)
    check_delta(delta)
    check_accountant(accountant)
    if steps < 1:
        raise UserError("calibrating a noise multiplier needs at least one step")

    # above the ceiling `epsilon` reports the RDP bound, so the RDP answer is the one that meets the target
    rdp = accountant == "rdp" or target_epsilon > PLD_EPSILON_CEILING

    def gap(sigma: float, discretization: float = PLD_DISCRETIZATION) -> float:  # as `epsilon` reports it
        history = [(sigma, sample_rate, steps)]
        spent = _rdp_epsilon(history, delta) if rdp else _pld_epsilon(history, delta, discretization)
        return spent * (1 + ROUNDING_MARGIN) - target_epsilon

    if gap(MAX_NOISE_MULTIPLIER) > 0:
        raise UserError(
            f"target epsilon {target_epsilon:g} is unreachable: even noise multiplier "
            f"{MAX_NOISE_MULTIPLIER:g} spends more over {steps} steps at sample rate {sample_rate:.4g} "
            f"(delta {delta:g}). Raise the target, or lower rounds, local epochs or the sample rate."
        )
    if rdp:  # cheap at any σ: search the whole range
        return _smallest_root(gap, 0.1, MAX_NOISE_MULTIPLIER, rtol)
    # PLD is slow at small σ, so bracket it tightly first: RDP over-reports ε, so it needs a bit
    # more noise than PLD (typically 3-8 %); a 10x coarser PLD grid then narrows it to ~1 %.
    upper = calibrate_noise(target_epsilon, sample_rate, steps, delta, "rdp", rtol=1e-2)
    rough = _smallest_root(lambda s: gap(s, 10 * PLD_DISCRETIZATION), upper * 0.85, upper, 1e-2)
    return _smallest_root(gap, rough * 0.99, rough, rtol)


def _smallest_root(gap, low: float, high: float, rtol: float) -> float:
    """The σ within ``rtol`` above the root of the decreasing ``gap`` with gap(σ) ≤ 0."""
    gap = lru_cache(maxsize=None)(gap)  # brentq re-evaluates the bracket ends
    while gap(high) > 0:
        low, high = high, high * 1.25
    while gap(low) <= 0:
        low, high = low * 0.5, low
    root = math.exp(optimize.brentq(lambda x: gap(math.exp(x)), math.log(low), math.log(high), xtol=rtol / 4))
    while gap(root) > 0:  # brentq's root may sit just on the wrong side of the target
        root *= 1 + rtol / 4
    return root


def _rdp_epsilon(entries: Sequence[Entry], delta: float) -> float:
    acc = rdp_privacy_accountant.RdpAccountant()
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    # dp-accounting warns (per order) when a fractional RDP order does not converge and leaves
    # that order out; the remaining orders still give a valid, only slightly looser, bound.
    absl_logger.setLevel(logging.ERROR)
    try:
        for sigma, rate, steps in entries:
            event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma))
            acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        return float(acc.get_epsilon(delta))
    finally:
        absl_logger.setLevel(level)


def _pld_epsilon(entries: Sequence[Entry], delta: float, discretization: float = PLD_DISCRETIZATION) -> float:
    # Composed onto the identity PLD, as PLDAccountant does: each composition adds its truncated
    # tail mass (1e-15) to the infinite loss, which moves ε at small δ (q = 1.6e-6, 1e5 steps,
    # δ = 1e-12: 0.020797 without it, PLDAccountant's 0.020812 with it).
    composed = pld_lib.identity(value_discretization_interval=discretization)
    for sigma, rate, steps in entries:
        composed = composed.compose(_self_compose(_subsampled_gaussian_pld(sigma, rate, discretization), steps))
    return float(composed.get_epsilon_for_delta(delta))


def _self_compose(pld: pld_lib.PrivacyLossDistribution, steps: int) -> pld_lib.PrivacyLossDistribution:
    """``pld.self_compose(steps)``, the same result, without dp-accounting's slow size check.

    At sample rates below ~1e-5 one step's PLD is sparse, and dp-accounting (0.6) decides between
    sparse and dense composition by computing ``size ** steps`` as an exact integer: a number with
    millions of digits for millions of steps (q = 1.6e-6, 6.25e6 steps: 26 s; 1e8 steps: minutes),
    which any client, or any claimed history the coordinator checks, can trigger. The same
    decision made with logarithms hands dp-accounting the dense PMF it would convert to anyway.
    """
    def as_composed(pmf: pld_pmf.PLDPmf) -> pld_pmf.PLDPmf:
        limit = pld_pmf._MAX_PMF_SPARSE_SIZE  # pylint: disable=protected-access
        if not isinstance(pmf, pld_pmf.SparsePLDPmf) or steps <= 1 or pmf.size <= 1:
            return pmf
        if steps * math.log(pmf.size) < math.log(limit) + 1 and pmf.size**steps <= limit:
            return pmf  # small: dp-accounting composes it sparsely, exactly
        return pmf.to_dense_pmf()

    # pylint: disable=protected-access
    remove = as_composed(pld._pmf_remove)
    add = None if pld._symmetric else as_composed(pld._pmf_add)
    return pld_lib.PrivacyLossDistribution(remove, add).self_compose(steps)


@lru_cache(maxsize=128)
def _subsampled_gaussian_pld(
    noise_multiplier: float, sample_rate: float, discretization: float
) -> pld_lib.PrivacyLossDistribution:
    """One step's PLD, as PLDAccountant builds it for PoissonSampledDpEvent(GaussianDpEvent)."""
    return pld_lib.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=discretization,
        sampling_prob=sample_rate,
        pessimistic_estimate=True,
    )
