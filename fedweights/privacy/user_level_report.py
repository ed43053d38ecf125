"""``user_privacy.json``: the user-level (ε, δ) a DP-FedAvg run has spent so far.

The file is rewritten (atomically) as soon as a round's training replies arrive, counting that
round before its noised model is released, so a run that stops at any point never reports fewer
rounds than it released.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from flwr.app import Message

from ..config import RunConfig
from ..fileio import atomic_write_json
from ..flower.round_loop import RoundHooks
from ..run_dir import RunDir
from .user_level import planned_guarantee, user_level_epsilon

USER_PRIVACY_FILE = "user_privacy.json"

GUARANTEE_NOTE = (
    "Client-level (user-level) DP of every released global model: central DP-FedAvg, the server is "
    "trusted to clip and add the noise; Poisson client sampling with rate sample_rate; accounted with "
    "dp-accounting's PLD accountant. Per-round logs in metrics.json (client counts, evaluation) are "
    "operator-side and not covered."
)


class UserLevelPrivacyFile(RoundHooks):
    """Keeps ``user_privacy.json`` (the ``user_level`` object plus a note) up to date during a run."""

    def __init__(self, config: RunConfig, run_dir: RunDir) -> None:
        self.plan = planned_guarantee(config.user_dp, config.clients, config.rounds)
        self.path = run_dir.path / USER_PRIVACY_FILE

    def on_train_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        """Account this round before its model is released."""
        p = self.plan
        spent = dataclasses.replace(
            p, rounds=server_round, epsilon=user_level_epsilon(p.sample_rate, p.noise_multiplier, server_round, p.delta)
        )
        atomic_write_json(self.path, {"user_level": spent.to_dict(), "note": GUARANTEE_NOTE})
