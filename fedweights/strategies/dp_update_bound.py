"""The furthest an honest DP-SGD client can move the model in one round, for the update screen.

Under ``--dp`` every client runs the same fixed loop (``privacy.dp_sgd``): T steps of SGD with
momentum β and learning rate η on per-example gradients clipped to C, summed, given Gaussian
noise of standard deviation σC and divided by Opacus' expected batch size E = int(n·q). The
round's update is then ``η Σ_t c_t g_t`` with momentum weights ``c_t = Σ_{k ≤ T-t} β^k`` (FedProx's
proximal step only shrinks them), so by the triangle inequality its norm is at most

- signal: η·C·c_max·(examples drawn)/E, where the draws over the round are Binomial with mean
  n·epochs (bounded here by that mean plus 6 standard deviations), plus
- noise: η·σC/E·√(Σ c_t²)·(√d + 6) for d learnt weights (a d-dimensional standard normal's norm
  exceeds √d + 6 with probability below e^-18).

This is a bound, not an estimate: an honest client is over it with probability ~e^-18, so a reply
that is (a broken client, a scaling attack) is rejected in any round, even with two sites, where
the median screen cannot judge and the model's own norm is no yardstick (DP noise sets the
update's size). The configuration (η, β, C, B, epochs and a fixed σ) is the server's; a client's
example count, and its σ when the run calibrates σ to a target ε, come from its reply's spend
(such a σ must be near the calibrated one: see ``_overstated_sigma``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import Message

from ..config import RunConfig
from ..errors import UserError

if TYPE_CHECKING:  # privacy.plan imports Opacus: only DP runs load it, when a reply is judged
    from ..privacy.dp_sgd import RoundPlan

TAIL = 6.0  # standard deviations of slack on the examples drawn, and on the noise's norm
TARGET_SHARE = 0.5  # under a target ε, a claimed σ must spend at least this share of it over the run


@dataclass(frozen=True)
class DPUpdateBound:
    """The bound for one DP run: its config says how every client trains (``privacy.plan``)."""

    config: RunConfig

    @classmethod
    def of_run(cls, config: RunConfig) -> DPUpdateBound | None:
        """The bound for a record-level DP run (None when ``--dp`` is off)."""
        return cls(config) if config.dp.enabled else None

    @property
    def noise_multiplier(self) -> float | None:
        """The run's σ; None under a target ε, where each client uses the σ it calibrated."""
        return None if self.config.dp.target_epsilon is not None else self._plan(1, None).noise_multiplier

    def norm_bound(self, n_examples: int, noise_multiplier: float, size: int) -> float:
        """The bound on one round's update norm for a client with ``n_examples`` examples training
        ``size`` weights at noise multiplier ``noise_multiplier``."""
        plan = self._plan(n_examples, noise_multiplier)
        expected_batch = plan.expected_batch_size  # as the client divides the noisy sum
        largest_weight, sum_of_squares = momentum_weights(self.config.momentum, plan.steps)
        drawn = float(n_examples * plan.local_epochs)
        drawn_max = drawn + TAIL * math.sqrt(drawn) + TAIL
        signal = self.config.lr * plan.max_grad_norm * largest_weight * drawn_max / expected_batch
        noise_std = noise_multiplier * plan.max_grad_norm / expected_batch
        noise = self.config.lr * noise_std * math.sqrt(sum_of_squares) * (math.sqrt(size) + TAIL)
        return signal + noise

    def problem(self, reply: Message, norm: float, size: int, weight: float) -> str | None:
        """Why ``reply``'s update (norm ``norm`` over ``size`` weights, FedAvg weight ``weight``) is
        more than DP-SGD can produce, or None. A reply without a readable spend is judged by its
        weight at the run's σ; under a target ε it is not judged (the ledger marks it unaccounted)."""
        n_examples, claimed = self._claims(reply, weight)
        if n_examples < 1 or (self.config.dp.target_epsilon is not None and claimed is None):
            return None
        sigma = self._plan(n_examples, claimed).noise_multiplier  # the run's σ, or the claimed calibrated one
        if not (math.isfinite(sigma) and sigma > 0):
            return f"its privacy spend states a noise multiplier of {sigma}, not a positive finite number"
        overstated = self._overstated_sigma(n_examples, sigma)
        if overstated is not None:
            return overstated
        bound = self.norm_bound(n_examples, sigma, size)
        if norm <= bound:
            return None
        config = self.config
        return (
            f"update norm {norm:.4g} is over {bound:.4g}, the furthest DP-SGD moves the model in one round "
            f"(lr {config.lr:g}, momentum {config.momentum:g}, max_grad_norm {config.dp.max_grad_norm:g}, "
            f"σ {sigma:g}, {n_examples} examples, batch {config.batch_size}, local epochs {config.local_epochs}): "
            "no client training as configured sends it (--no-dp-update-bound turns this check off)"
        )

    def _plan(self, n_examples: int, sigma: float | None) -> RoundPlan:
        """The client's round as it plans it (``sigma``: its calibrated σ under a target ε)."""
        from ..privacy.plan import round_plan

        return round_plan(n_examples, self.config, sigma)

    def _overstated_sigma(self, n_examples: int, sigma: float) -> str | None:
        """Under a target ε, why a claimed σ is far above the one a client calibrates (None when it
        is not): over the planned run it would spend under ``TARGET_SHARE`` of the target, while
        calibration spends the target (within 1 %). A client claiming more noise than it added
        would otherwise widen the bound it is judged by. ε here is RDP's: never below the PLD value
        clients calibrate with, so an honest σ always passes, and instant for any step count a
        reply implies (PLD takes seconds for some 10^8-step histories)."""
        target = self.config.dp.target_epsilon
        if target is None:
            return None
        from ..privacy.accounting import epsilon
        from ..privacy.plan import client_delta

        plan, rounds = self._plan(n_examples, sigma), self.config.rounds
        planned = [(sigma, plan.sample_rate, plan.steps * rounds)]
        try:
            spent = epsilon(planned, client_delta(n_examples, self.config.dp), "rdp")
        except UserError as exc:  # σ above any calibration, or a run no accounting covers
            return f"its privacy spend states σ {sigma:g}, with {n_examples} examples a run fedweights cannot account ({exc})"
        if spent >= TARGET_SHARE * target:
            return None
        return (
            f"its privacy spend states σ {sigma:g}, which over the planned {rounds} rounds would spend "
            f"ε={spent:.3g}, under {TARGET_SHARE:g}x the target {target:g} that clients "
            "calibrate σ to: more noise than a client adds (it would widen the bound its update is judged by)"
        )

    @staticmethod
    def _claims(reply: Message, weight: float) -> tuple[int, float | None]:
        """(example count, claimed σ) to judge ``reply`` by: of the spend's count and the FedAvg
        weight (the same number from an honest client) the smaller, so neither widens the bound alone."""
        from ..privacy.protocol import PRIVACY, ClientSpend

        try:
            spend = ClientSpend.from_record(reply.content[PRIVACY])
            return min(int(spend.n_examples), int(weight)), float(spend.noise_multiplier)
        except (KeyError, ValueError, TypeError, OverflowError):
            return int(weight), None


def momentum_weights(beta: float, steps: int) -> tuple[float, float]:
    """The largest momentum weight c_t = Σ_{k < T-t} β^k of a T-step round, and Σ_t c_t², in
    closed form (T is any count a reply implies, so no loop over it)."""
    if beta == 0:
        return 1.0, float(steps)
    tail = beta**steps
    largest = (1 - tail) / (1 - beta)
    # Σ_{j=1..T} (1 - β^j)² / (1 - β)²
    squares = steps - 2 * beta * (1 - tail) / (1 - beta) + beta**2 * (1 - tail * tail) / (1 - beta**2)
    return largest, max(squares, 0.0) / (1 - beta) ** 2
