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

from flwr.app import Message

from ..config import DPConfig, RunConfig
from ..errors import UserError
from ..privacy.accounting import epsilon
from ..privacy.plan import DEFAULT_NOISE_MULTIPLIER, batches_per_epoch, client_delta
from ..privacy.protocol import PRIVACY, ClientSpend

TAIL = 6.0  # standard deviations of slack on the examples drawn, and on the noise's norm
TARGET_SHARE = 0.5  # under a target ε, a claimed σ must spend at least this share of it over the run


@dataclass(frozen=True)
class DPUpdateBound:
    """The run's DP-SGD settings; ``noise_multiplier`` None: each client's own (calibrated) σ."""

    lr: float
    momentum: float
    max_grad_norm: float
    batch_size: int
    local_epochs: int
    noise_multiplier: float | None
    rounds: int = 1  # with ``target``: the planned run a claimed σ must be calibrated for
    target: DPConfig | None = None  # under a target ε: the run's DP settings (δ rule, accountant)

    @classmethod
    def of_run(cls, config: RunConfig) -> DPUpdateBound | None:
        """The bound for a record-level DP run (None when ``--dp`` is off)."""
        dp = config.dp
        if not dp.enabled:
            return None
        settings = (config.lr, config.momentum, dp.max_grad_norm, config.batch_size, config.local_epochs)
        if dp.target_epsilon is not None:
            return cls(*settings, None, config.rounds, dp)
        return cls(*settings, dp.noise_multiplier if dp.noise_multiplier is not None else DEFAULT_NOISE_MULTIPLIER)

    def norm_bound(self, n_examples: int, noise_multiplier: float, size: int) -> float:
        """The bound on one round's update norm for a client with ``n_examples`` examples training
        ``size`` weights at noise multiplier ``noise_multiplier``."""
        batches = batches_per_epoch(n_examples, self.batch_size)
        steps = batches * self.local_epochs
        expected_batch = max(1, int(n_examples * (1.0 / batches)))  # as Opacus divides the noisy sum
        largest_weight, sum_of_squares = momentum_weights(self.momentum, steps)
        drawn = float(n_examples * self.local_epochs)
        drawn_max = drawn + TAIL * math.sqrt(drawn) + TAIL
        signal = self.lr * self.max_grad_norm * largest_weight * drawn_max / expected_batch
        noise_std = noise_multiplier * self.max_grad_norm / expected_batch
        noise = self.lr * noise_std * math.sqrt(sum_of_squares) * (math.sqrt(size) + TAIL)
        return signal + noise

    def problem(self, reply: Message, norm: float, size: int) -> str | None:
        """Why ``reply``'s update (norm ``norm`` over ``size`` weights) is more than DP-SGD can
        produce, or None. A reply without a readable spend is judged by its example count at the
        run's σ; under a target ε it is not judged (the ledger marks it unaccounted)."""
        n_examples, sigma = self._claims(reply)
        if n_examples is None or sigma is None:
            return None
        if not (math.isfinite(sigma) and sigma > 0):
            return f"its privacy spend states a noise multiplier of {sigma}, not a positive finite number"
        overstated = self._overstated_sigma(n_examples, sigma)
        if overstated is not None:
            return overstated
        bound = self.norm_bound(n_examples, sigma, size)
        if norm <= bound:
            return None
        return (
            f"update norm {norm:.4g} is over {bound:.4g}, the furthest DP-SGD moves the model in one round "
            f"(lr {self.lr:g}, momentum {self.momentum:g}, max_grad_norm {self.max_grad_norm:g}, σ {sigma:g}, "
            f"{n_examples} examples, batch {self.batch_size}, local epochs {self.local_epochs}): no client "
            "training as configured sends it (--no-dp-update-bound turns this check off)"
        )

    def _overstated_sigma(self, n_examples: int, sigma: float) -> str | None:
        """Under a target ε, why a claimed σ is far above the one a client calibrates (None when it
        is not): over the planned run it would spend under ``TARGET_SHARE`` of the target, while
        calibration spends the target (within 1 %). A client claiming more noise than it added
        would otherwise widen the bound it is judged by. ε here is RDP's: never below the PLD value
        clients calibrate with, so an honest σ always passes, and instant for any step count a
        reply implies (PLD can take minutes for a sample rate near 1e-6)."""
        if self.target is None or self.target.target_epsilon is None:
            return None
        batches = batches_per_epoch(n_examples, self.batch_size)
        planned = [(sigma, 1.0 / batches, batches * self.local_epochs * self.rounds)]
        try:
            spent = epsilon(planned, client_delta(n_examples, self.target), "rdp")
        except UserError:  # e.g. σ above the largest calibration ever returns
            spent = 0.0
        if spent >= TARGET_SHARE * self.target.target_epsilon:
            return None
        return (
            f"its privacy spend states σ {sigma:g}, which over the planned {self.rounds} rounds would spend "
            f"ε={spent:.3g}, under {TARGET_SHARE:g}x the target {self.target.target_epsilon:g} that clients "
            "calibrate σ to: more noise than a client adds (it would widen the bound its update is judged by)"
        )

    def _claims(self, reply: Message) -> tuple[int | None, float | None]:
        """(example count, σ) to judge ``reply`` by: of the spend's count and the FedAvg weight
        (the same number from an honest client) the smaller, so neither can widen the bound alone."""
        weight = _example_count(reply)
        try:
            spend = ClientSpend.from_record(reply.content[PRIVACY])
            n_examples, claimed = int(spend.n_examples), float(spend.noise_multiplier)
        except (KeyError, ValueError, TypeError, OverflowError):
            n_examples, claimed = weight, None
        if weight is not None and n_examples is not None:
            n_examples = min(n_examples, weight)
        if n_examples is None or n_examples < 1:
            return None, None
        return n_examples, self.noise_multiplier if self.noise_multiplier is not None else claimed


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


def _example_count(reply: Message) -> int | None:
    for record in reply.content.metric_records.values():
        value = record.get("num-examples")
        if isinstance(value, int | float) and math.isfinite(value):
            return int(value)
    return None
