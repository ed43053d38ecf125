"""Write your own aggregation: a trimmed, norm-weighted average as a Flower strategy.

Run it:  .venv/bin/python examples/custom_strategy.py [RUN_DIR]
It trains the digits MLP with 10 clients, 2 of which send sign-flipped updates scaled ×10, and
aggregates with the strategy below. The same class works from the command line:

    PYTHONPATH=examples .venv/bin/fedweights simulate --clients 10 --malicious 2 \
        --strategy custom_strategy:TrimmedNormWeightedMean --max-norm-ratio 0

and in any stock Flower ServerApp (``TrimmedNormWeightedMean().start(grid=..., initial_arrays=...)``).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg

import fedweights
from fedweights.config import AttackConfig, StrategyConfig


class TrimmedNormWeightedMean(FedAvg):
    """Drop the ``trim`` updates with the largest L2 norms; average the rest, each weighted by
    ``min(1, median norm / its norm)`` so that no single update dominates.

    Subclassing FedAvg keeps its sampling, messages and metric averaging; fedweights passes the
    run's sampling settings (``fraction_train``, ``min_available_nodes``, …) as keyword arguments.
    """

    linear_in_updates = False  # data-dependent weights: refuse encrypted (--he) updates

    def __init__(self, trim: int = 2, **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        self.trim = trim
        self.global_arrays: ArrayRecord | None = None

    def configure_train(self, server_round, arrays, config, grid):
        self.global_arrays = arrays  # the model the clients start from: updates are relative to it
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        start = self.global_arrays.to_numpy_ndarrays()
        updates = [
            [w - g for w, g in zip(reply.content[self.arrayrecord_key].to_numpy_ndarrays(), start)] for reply in valid
        ]
        norms = np.array([np.sqrt(sum(float(np.sum(u * u)) for u in update)) for update in updates])
        keep = np.argsort(norms)[: max(1, len(updates) - self.trim)]
        weights = np.minimum(1.0, np.median(norms[keep]) / np.maximum(norms[keep], 1e-12))
        mean = [sum(w * updates[i][layer] for w, i in zip(weights, keep)) / weights.sum() for layer in range(len(start))]
        arrays = ArrayRecord({k: Array(np.asarray(g + m, dtype=g.dtype)) for k, g, m in zip(self.global_arrays.keys(), start, mean)})
        metrics = self.train_metrics_aggr_fn([valid[i].content for i in keep], self.weighted_by_key)
        return arrays, metrics


def main(out: str | None = None) -> fedweights.RunResult:
    config = fedweights.RunConfig(
        clients=10,
        rounds=4,
        local_epochs=2,
        # module:Class, as on the CLI; max_norm_ratio=0 turns off fedweights' own screen of updates far
        # larger than the round's median, so what you see is this strategy's defence alone
        strategy=StrategyConfig(name="custom_strategy:TrimmedNormWeightedMean", max_norm_ratio=0),
        attack=AttackConfig(malicious=2, kind="sign-flip", scale=10.0),
        out=out,
    )
    result = fedweights.simulate(config)
    print(f"final accuracy {result.final_accuracy:.3f} with 2 of 10 clients attacking; files in {result.run_dir}")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1] if len(sys.argv) > 1 else None)
