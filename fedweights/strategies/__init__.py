"""Server strategies: Flower ``flwr.serverapp.strategy.Strategy`` objects chosen by the run config."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, Strategy

from ..config import RunConfig


def build_strategy(config: RunConfig) -> Strategy:
    """The strategy a run uses (FedAvg with the run's sampling settings; encrypted FedAvg with ``--he``)."""
    if config.he.enabled:
        from .encrypted import build_encrypted_strategy

        return build_encrypted_strategy(config)
    return FedAvg(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_replies,
        min_evaluate_nodes=config.min_replies,
        min_available_nodes=config.wait_for_clients,
    )


__all__ = ["Strategy", "build_strategy"]
