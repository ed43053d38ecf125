"""DP-FedAvg over encrypted updates (``--user-dp --he``): Poisson sampling, distributed noise.

The coordinator samples like ``UserLevelDPFedAvg`` and adds ciphertexts like ``EncryptedFedAvg``;
it never sees an update or the noise. Each sampled client clips its update to S and adds its
noise share N(0, (z·S)²/n) for the round's cohort of n (``fedweights.privacy.distributed``), and
the clients decrypting the sum apply the fixed-denominator step (``flower.encrypted_state``).
A round whose Poisson sample is empty asks one node for a noise-only share, so every round
releases the same noise as central DP-FedAvg. The guarantee assumes honest clients.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from ..config import RunConfig
from ..crypto.codec import check_key
from ..crypto.envelope import EnvelopeError, read_header
from ..crypto.keys import HEKey
from ..flower.encrypted_state import UPDATE
from ..proto import update_pb2 as pb
from .encrypted import NOISE_ONLY, EncryptedFedAvg
from .registry import sampling_options

log = logging.getLogger("fedweights.he")


class EncryptedUserDPFedAvg(EncryptedFedAvg):
    """User-level DP-FedAvg whose clients clip, add their noise share and encrypt.

    Parameters
    ----------
    key : HEKey
        The coordinator's context (no secret key).
    sample_rate : float
        q: probability that a node is sampled in a round.
    sampler : random.Random, optional
        Source of the sampling coin flips (default: the OS's CSPRNG).
    **kwargs
        Passed to ``EncryptedFedAvg`` (``query_timeout``, sampling settings).
    """

    def __init__(self, key: HEKey, sample_rate: float, sampler: random.Random | None = None, **kwargs) -> None:
        super().__init__(key, state_section=UPDATE, **kwargs)
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.sample_rate = sample_rate
        self.sampler = sampler or random.SystemRandom()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Poisson-sample nodes (one noise-only node when none is sampled); announce the cohort size."""
        self._begin_round(server_round, arrays)
        _, nodes = sample_nodes(grid, self.min_available_nodes, 0)  # waits until enough nodes are connected
        chosen = [node for node in nodes if self.sampler.random() < self.sample_rate]
        noise_only = not chosen and bool(nodes)
        if noise_only:
            chosen = [self.sampler.choice(sorted(nodes))]
        self._check_summands(server_round, len(chosen), "user_dp.clients_per_round")
        log.info("round %d: Poisson-sampled %d of %d nodes%s", server_round, 0 if noise_only else len(chosen),
                 len(nodes), " (one asked for a noise-only share)" if noise_only else "")
        planned = dict.fromkeys(chosen, 1)  # DP-FedAvg: every client weighs 1
        config[NOISE_ONLY] = noise_only
        return self._train_messages(server_round, arrays, config, planned)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The encrypted sum of the noised shares; training metrics are dropped (the noise does not cover them)."""
        arrays, _ = super().aggregate_train(server_round, replies)
        return arrays, MetricRecord()

    def _check_reply(self, content: RecordDict) -> pb.EncryptedHeader:
        """Every client weighs 1 (DP-FedAvg), so the reply's example count is not compared."""
        if self.arrayrecord_key not in content.array_records:
            raise EnvelopeError("reply carries no arrays record")
        header = read_header(content.array_records[self.arrayrecord_key])
        check_key(header, self.key)
        return header


def encrypted_user_dp_strategy(config: RunConfig, key: HEKey) -> EncryptedUserDPFedAvg:
    """``--user-dp --he``: the run's ``[user_dp]`` sample rate, sampling and evaluation settings."""
    from ..privacy.user_level import planned_guarantee

    plan = planned_guarantee(config.user_dp, config.clients, config.rounds)
    options = sampling_options(config)
    return EncryptedUserDPFedAvg(
        key,
        plan.sample_rate,
        query_timeout=config.round_timeout,
        fraction_evaluate=options["fraction_evaluate"],
        min_evaluate_nodes=options["min_evaluate_nodes"],
        min_available_nodes=options["min_available_nodes"],
        max_examples=config.strategy.max_examples,  # refused above it, as on the plaintext path
    )
