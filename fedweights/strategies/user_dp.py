"""DP-FedAvg (McMahan et al. 2018): user-level differential privacy on the server.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` clips and noises on the server too, but it
does not fit this guarantee: it averages with the wrapped strategy's example weights over the
clients that happened to reply (so one client's influence is not bounded by S/m), skips the whole
round when any client reports an error, and divides by zero on an all-zero update. This strategy
is the fixed-denominator estimator of the paper, built on Flower's FedAvg for sampling messages
and evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from ..config import RunConfig
from ..privacy.distributed import clip_l2
from ..privacy.user_level import planned_guarantee
from .reply_checks import decoded_arrays


class UserLevelDPFedAvg(FedAvg):
    """FedAvg with Poisson client sampling, per-client clipping and Gaussian noise on the sum.

    Each round every connected node is sampled independently with probability ``sample_rate``
    (q = m / N). A sampled client's update Δ = w − w_global is clipped to L2 norm
    ``clipping_norm`` (S); the server adds N(0, (z·S)²) per coordinate to the sum of the clipped
    updates and divides by the expected number of sampled clients ``expected_clients`` (m), a fixed
    denominator, so one client moves the model by at most S/m whatever the sample size. Every client
    counts equally (example-count weights would break that bound). A round in which no client is
    sampled still releases a noised model and is accounted like any other. Training metrics are not
    aggregated: they would leak information that the noise does not cover. Integer arrays (counters)
    keep their global value.

    Parameters
    ----------
    noise_multiplier : float
        z: noise std on the sum, in units of ``clipping_norm``.
    clipping_norm : float
        S: largest L2 norm of one client's update.
    sample_rate : float
        q: probability that a node is sampled in a round.
    expected_clients : float
        m = q · N: the fixed denominator of the average.
    sampler : random.Random, optional
        Source of the sampling coin flips (default: the OS's CSPRNG).
    noise_rng : numpy.random.Generator, optional
        Source of the noise (default: a generator seeded from OS entropy). Neither it nor
        ``sampler`` is saved in checkpoints: a resumed run draws fresh noise, so a round run again
        after a restart never repeats the noise of a model it may already have released, and the
        checkpoint does not hold what it takes to predict the noise.
    **fedavg_kwargs
        Passed to ``FedAvg`` (evaluation sampling, ``min_available_nodes``, record keys).
    """

    # the noise source must never be restored (a re-run round would repeat its noise) nor written down;
    # the sampler is the OS's CSPRNG, and the model copy is per-round scratch
    checkpoint_exclude = ("noise_rng", "sampler", "current_arrays")

    def __init__(
        self,
        noise_multiplier: float,
        clipping_norm: float,
        sample_rate: float,
        expected_clients: float,
        *,
        sampler: random.Random | None = None,
        noise_rng: np.random.Generator | None = None,
        **fedavg_kwargs,
    ) -> None:
        super().__init__(train_metrics_aggr_fn=_no_metrics, **fedavg_kwargs)
        if noise_multiplier <= 0 or clipping_norm <= 0 or expected_clients <= 0 or not 0 < sample_rate <= 1:
            raise ValueError("noise_multiplier, clipping_norm and expected_clients must be > 0, sample_rate in (0, 1]")
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.sample_rate = sample_rate
        self.expected_clients = expected_clients
        self.sampler = sampler or random.SystemRandom()
        self.noise_rng = noise_rng or np.random.default_rng()
        self.current_arrays: ArrayRecord | None = None

    def summary(self) -> None:
        """Log the DP-FedAvg settings."""
        log(
            INFO,
            "\t├──> User-level DP-FedAvg: z=%s, S=%s, q=%s, m=%s",
            self.noise_multiplier, self.clipping_norm, self.sample_rate, self.expected_clients,
        )  # fmt: skip
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Poisson sampling: each connected node joins this round with probability ``sample_rate``."""
        self.current_arrays = arrays
        _, nodes = sample_nodes(grid, self.min_available_nodes, 0)  # waits until enough nodes are connected
        chosen = [node for node in nodes if self.sampler.random() < self.sample_rate]
        log(INFO, "configure_train: Poisson-sampled %d of %d nodes (q=%g)", len(chosen), len(nodes), self.sample_rate)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """global + (Σ clip(Δ_i, S) + N(0, (zS)²)) / m, released even when no client replied."""
        if self.current_arrays is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        # no cross-reply consistency check (Flower's raises for the whole round): each reply is
        # screened on its own below, so one bad client never takes the round down
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        current = {k: a.numpy() for k, a in self.current_arrays.items()}
        sums = {k: np.zeros(v.shape, dtype=np.float64) for k, v in current.items() if v.dtype.kind == "f"}
        used = 0
        for reply in valid:
            delta, problem = client_update(reply, self.current_arrays, current, sums)
            if problem is not None:  # counts as a zero update: still within the S bound, noise unchanged
                log(WARNING, "aggregate_train: node %s: update ignored: %s", reply.metadata.src_node_id, problem)
                continue
            used += 1
            for key, value in clip_l2(delta, self.clipping_norm).items():
                sums[key] += value
        std = self.noise_multiplier * self.clipping_norm
        for total in sums.values():
            total += self.noise_rng.normal(0.0, std, total.shape)
        log(
            INFO,
            "aggregate_train: %d clipped update(s) (S=%g) + noise std %g, divided by m=%g",
            used, self.clipping_norm, std, self.expected_clients,
        )  # fmt: skip
        new = {
            k: Array(np.asarray(v + sums[k] / self.expected_clients, dtype=v.dtype) if k in sums else v)
            for k, v in current.items()
        }
        return ArrayRecord(new), MetricRecord()


def user_dp_strategy(config: RunConfig) -> UserLevelDPFedAvg:
    """DP-FedAvg with the run's ``[user_dp]`` settings (the noise multiplier derived if a target ε is set)."""
    plan = planned_guarantee(config.user_dp, config.clients, config.rounds)
    return UserLevelDPFedAvg(
        plan.noise_multiplier,
        plan.clipping_norm,
        plan.sample_rate,
        plan.sample_rate * plan.population,
        fraction_evaluate=config.fraction_evaluate,
        min_evaluate_nodes=config.min_replies,
        min_available_nodes=config.wait_for_clients,
    )


def client_update(
    reply: Message, global_arrays: ArrayRecord, current: dict[str, np.ndarray], keys: Iterable[str]
) -> tuple[dict[str, np.ndarray], str | None]:
    """(the reply's update over ``keys`` in float64, None) or ({}, why it cannot be used): the checks
    of update validation (``reply_checks.decoded_arrays``), then a finite difference."""
    values, problem = decoded_arrays(reply, global_arrays)
    if problem is not None:
        return {}, problem
    delta = {key: values[key].astype(np.float64) - current[key] for key in keys}
    if not all(np.isfinite(d).all() for d in delta.values()):
        return {}, "the update is too large to subtract from the global model"
    return delta, None


def _no_metrics(_records: list[RecordDict], _weight_key: str) -> MetricRecord:
    return MetricRecord()
