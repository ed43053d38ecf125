"""Update validation: a Strategy wrapper that screens every training reply before any aggregation.

``ValidatedStrategy(strategy, max_norm)`` wraps any Flower strategy (built-in or your own), the way
Flower's DP wrappers do. A reply is excluded, with its reason logged and kept in
``rejected[server_round]``, when its update

- does not carry exactly one ArrayRecord with the global model's keys, shapes and dtypes,
- holds a NaN or infinite value,
- moves the model further than ``max_norm`` (L2 norm of ``reply - global``, when a bound is set), or
- lacks a positive, finite example count (the FedAvg weight) or has other metrics than its peers.

Only accepted replies reach the wrapped strategy; replies that carry an error are dropped too
(the round loop already reports them), so one bad client never takes a round down. The new global
model must have the old one's keys, shapes and finite values (else the round fails with the
strategy named, before anything is saved) and is cast back to the old one's dtypes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from ..errors import RunFailed

REJECTED_PREFIX = "update rejected: "


class ValidatedStrategy(Strategy):
    """Runs ``strategy`` on the training replies that pass validation against the global model."""

    checkpoint_exclude = ("rejected", "_global")  # both live within one round

    def __init__(self, strategy: Strategy, max_norm: float | None = None) -> None:
        self.strategy = strategy
        self.max_norm = max_norm
        self.rejected: dict[int, list[dict[str, str]]] = {}
        self._global: ArrayRecord | None = None

    def __repr__(self) -> str:
        return f"ValidatedStrategy({self.strategy!r}, max_norm={self.max_norm})"

    def summary(self) -> None:
        """Log the validation settings, then the wrapped strategy's."""
        log(INFO, "\t├──> Update validation: max_norm=%s", self.max_norm)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the replies will be checked against, then delegate."""
        self._global = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the accepted replies with the wrapped strategy."""
        accepted, rejected = self.screen(replies)
        self.rejected[server_round] = rejected
        for item in rejected:
            log(WARNING, "round %d: node %s: %s", server_round, item["node"], item["reason"])
        arrays, metrics = self.strategy.aggregate_train(server_round, accepted)
        if arrays is None:
            return None, metrics
        problem = model_problem(arrays, self._global, same_dtypes=False) if isinstance(arrays, ArrayRecord) else (
            f"it is a {type(arrays).__name__}, not an ArrayRecord")
        if problem is not None:  # never checkpointed nor sent to clients
            raise RunFailed(f"round {server_round}: {type(self.strategy).__name__}.aggregate_train returned a new "
                            f"global model unlike the old one: {problem}. Fix the strategy; this round is not used")
        return _with_dtypes_of(self._global, arrays), metrics

    def screen(self, replies: Iterable[Message]) -> tuple[list[Message], list[dict[str, str]]]:
        """Split replies into accepted ones and ``{"node", "reason"}`` records of rejected ones."""
        if self._global is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        candidates = [r for r in replies if not r.has_error()]
        weight_key = getattr(self.strategy, "weighted_by_key", "num-examples")
        usual_metrics = _most_common_metric_keys(candidates)
        accepted, rejected = [], []
        for reply in candidates:
            problem = update_problem(reply, self._global, self.max_norm) or _metrics_problem(
                reply, weight_key, usual_metrics
            )
            if problem is None:
                accepted.append(reply)
            else:
                rejected.append({"node": str(reply.metadata.src_node_id), "reason": REJECTED_PREFIX + problem})
        return accepted, rejected

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate."""
        return self.strategy.aggregate_evaluate(server_round, replies)


def update_problem(reply: Message, global_arrays: ArrayRecord, max_norm: float | None = None) -> str | None:
    """Why a reply's arrays cannot be aggregated into ``global_arrays`` (None when they can)."""
    records = reply.content.array_records
    if len(records) != 1:
        return f"expected one ArrayRecord, got {len(records)}"
    arrays = next(iter(records.values()))
    problem = model_problem(arrays, global_arrays)
    if problem is not None or max_norm is None:
        return problem
    squared = sum(
        float(np.sum(np.square(arrays[k].numpy().astype(np.float64) - ref.numpy().astype(np.float64))))
        for k, ref in global_arrays.items()
    )
    norm = math.sqrt(squared)
    return None if norm <= max_norm else f"update norm {norm:.4g} exceeds max_norm {max_norm:g}"


def model_problem(arrays: ArrayRecord, reference: ArrayRecord, same_dtypes: bool = True) -> str | None:
    """Why ``arrays`` is not a model like ``reference`` (keys, shapes, dtypes, finite values), or None."""
    missing, extra = set(reference) - set(arrays), set(arrays) - set(reference)
    if missing or extra:
        return f"keys differ from the global model (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    for key, ref in reference.items():
        array = arrays[key]
        if tuple(array.shape) != tuple(ref.shape) or (same_dtypes and array.dtype != ref.dtype):
            return f"'{key}' is {array.dtype}{list(array.shape)}, the global model has {ref.dtype}{list(ref.shape)}"
        values = array.numpy()
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            return f"'{key}' holds NaN or infinite values"
    return None


def rejected_updates(strategy: Strategy, server_round: int) -> list[dict[str, str]]:
    """The replies ``strategy`` excluded in ``server_round``: any strategy that keeps them in a
    ``rejected`` dict by round (ValidatedStrategy, the --he EncryptedFedAvg); [] for others."""
    rejected = getattr(strategy, "rejected", None)
    return list(rejected.get(server_round, [])) if isinstance(rejected, dict) else []


def _with_dtypes_of(reference: ArrayRecord, arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` cast back to the global model's dtypes (e.g. Flower's FedAdam returns float64), so
    the next round's updates are checked against, and the model keeps, the dtypes it started with."""
    if all(k in reference and arrays[k].dtype == reference[k].dtype for k in arrays):
        return arrays
    return ArrayRecord(
        {k: Array(v.numpy().astype(reference[k].numpy().dtype)) if k in reference else v for k, v in arrays.items()}
    )


def _metrics_problem(reply: Message, weight_key: str, usual_keys: frozenset[str] | None) -> str | None:
    records = reply.content.metric_records
    if len(records) != 1:
        return f"expected one MetricRecord, got {len(records)}"
    metrics = next(iter(records.values()))
    weight = metrics.get(weight_key)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"'{weight_key}' must be a positive finite number, got {weight!r}"
    if usual_keys is not None and frozenset(metrics) != usual_keys:
        return f"metric keys {sorted(metrics)} differ from the other clients' {sorted(usual_keys)}"
    return None


def _most_common_metric_keys(replies: list[Message]) -> frozenset[str] | None:
    keys = Counter(
        frozenset(next(iter(r.content.metric_records.values()))) for r in replies if len(r.content.metric_records) == 1
    )
    return keys.most_common(1)[0][0] if keys else None
