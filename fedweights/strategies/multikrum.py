"""Multi-Krum whose default selection follows the round's replies.

Flower's ``MultiKrum`` averages a fixed ``num_nodes_to_select`` updates. Set once from the
sampled clients (n − f), a round with dropouts that gets n − f replies or fewer averages all of
them, the f attackers included: no protection at all. Without a count of its own (``[strategy]
krum_select``) this class averages the n_replies − f best-scored updates of each round.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import MultiKrum


class PerRoundMultiKrum(MultiKrum):
    """Flower's MultiKrum; ``num_nodes_to_select=None`` averages (valid replies − f) each round."""

    def __init__(self, *, num_nodes_to_select: int | None = None, **kwargs) -> None:
        super().__init__(num_nodes_to_select=num_nodes_to_select or 1, **kwargs)
        self.fixed_selection = num_nodes_to_select

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Select this round's count from the replies that carry an update, then Flower's MultiKrum."""
        replies = list(replies)
        if self.fixed_selection is None:
            updates = sum(not reply.has_error() for reply in replies)
            self.num_nodes_to_select = max(1, updates - self.num_malicious_nodes)
        return super().aggregate_train(server_round, replies)

    def summary(self) -> None:
        """Log the settings (Flower's would show the placeholder count 1)."""
        if self.fixed_selection is not None:
            return super().summary()
        log(INFO, "\t├──> MultiKrum settings:")
        log(INFO, "\t│\t├── Number of malicious nodes: %d", self.num_malicious_nodes)
        log(INFO, "\t│\t└── Number of nodes to select: the round's replies - %d", self.num_malicious_nodes)
        return super(MultiKrum, self).summary()  # the FedAvg settings, as Flower's MultiKrum does
