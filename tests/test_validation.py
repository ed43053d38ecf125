"""Update validation: bad updates are excluded with a reason before any strategy aggregates them."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg, FedMedian

from fedweights.errors import RunFailed
from fedweights.strategies import ValidatedStrategy, rejected_updates

from .flower_messages import NodesGrid, array_record, error_reply, train_reply

GLOBAL = {"w": np.zeros((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


def update(value: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) for k, v in GLOBAL.items()}


def validated(inner=None, max_norm=None) -> ValidatedStrategy:
    strategy = ValidatedStrategy(inner or FedAvg(min_available_nodes=1), max_norm=max_norm)
    list(strategy.configure_train(1, array_record(GLOBAL), ConfigRecord(), NodesGrid([1, 2])))
    return strategy


BAD_UPDATES = [
    (train_reply(11, {"w": GLOBAL["w"]}), "keys differ from the global model (missing ['b']"),
    (train_reply(12, {**update(0.1), "extra": np.ones(1, np.float32)}), "unexpected ['extra']"),
    (train_reply(13, {**update(0.1), "w": np.zeros((2, 3), np.float32)}), "'w' is float32[2, 3], the global model has float32[3, 2]"),
    (train_reply(14, {**update(0.1), "b": np.zeros(2, np.float64)}), "'b' is float64[2]"),
    (train_reply(15, {**update(0.1), "b": np.array([0.0, np.nan], np.float32)}), "'b' holds NaN or infinite values"),
    (train_reply(16, {**update(0.1), "w": np.full((3, 2), np.inf, np.float32)}), "'w' holds NaN or infinite values"),
    (train_reply(17, update(0.1), num_examples=0), "'num-examples' must be a positive finite number"),
    (train_reply(18, update(0.1), num_examples=float("nan")), "'num-examples' must be a positive finite number"),
    (train_reply(19, update(0.1), extra_metric=1.0), "metric keys"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_UPDATES)
def test_a_bad_update_is_excluded_with_its_reason_and_the_round_still_aggregates(bad, reason):
    strategy = validated()
    good = [train_reply(1, update(1.0)), train_reply(2, update(3.0))]
    arrays, metrics = strategy.aggregate_train(1, [good[0], bad, good[1]])
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)  # mean of the two good updates only
    (rejection,) = rejected_updates(strategy, 1)
    assert rejection["node"] == str(bad.metadata.src_node_id)
    assert rejection["reason"].startswith("update rejected: ") and reason in rejection["reason"]


def test_norm_bound_excludes_large_updates_only():
    strategy = validated(max_norm=2.0)
    # norm of update(v) is |v|·sqrt(8): 0.5 → 1.41 (kept), 1.0 → 2.83 (rejected)
    arrays, _ = strategy.aggregate_train(1, [train_reply(1, update(0.5)), train_reply(2, update(-1.0))])
    np.testing.assert_allclose(arrays["b"].numpy(), 0.5)
    assert [r["reason"] for r in rejected_updates(strategy, 1)] == ["update rejected: update norm 2.828 exceeds max_norm 2"]


def test_error_replies_are_dropped_before_the_strategy_sees_them():
    strategy = validated()
    arrays, _ = strategy.aggregate_train(1, [error_reply(3), train_reply(1, update(2.0))])
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)
    assert rejected_updates(strategy, 1) == []  # errors are reported by the round loop, not as rejections


def test_wraps_any_strategy_and_keeps_rounds_apart():
    strategy = validated(FedMedian(min_available_nodes=1))

    def replies():  # fresh messages each round: Flower's FedMedian empties the replies it aggregates
        return [train_reply(n, update(v)) for n, v in [(1, 1.0), (2, 2.0), (3, 100.0)]]

    arrays, _ = strategy.aggregate_train(1, replies() + [train_reply(4, {"w": GLOBAL["w"]})])
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)
    assert [r["node"] for r in rejected_updates(strategy, 1)] == ["4"]
    strategy.aggregate_train(2, replies())
    assert rejected_updates(strategy, 2) == [] and len(rejected_updates(strategy, 1)) == 1
    assert rejected_updates(FedAvg(), 1) == []  # unwrapped strategies reject nothing


def test_all_updates_rejected_gives_no_model():
    strategy = validated()
    assert strategy.aggregate_train(1, [train_reply(1, {"w": GLOBAL["w"]})]) == (None, None)


def test_new_global_model_keeps_the_dtypes_of_the_old_one():
    class Float64Mean(FedAvg):  # like Flower's FedAdam, whose numpy-scalar arithmetic returns float64
        def aggregate_train(self, server_round, replies):
            arrays, metrics = super().aggregate_train(server_round, replies)
            return array_record({k: a.numpy().astype(np.float64) for k, a in arrays.items()}), metrics

    strategy = validated(Float64Mean(min_available_nodes=1))
    arrays, _ = strategy.aggregate_train(1, [train_reply(1, update(1.0))])
    assert {a.dtype for a in arrays.values()} == {"float32"}


class Broken(FedAvg):
    """A user strategy whose new global model is malformed in the way ``change`` says."""

    def __init__(self, change) -> None:
        super().__init__(min_available_nodes=1)
        self.change = change

    def aggregate_train(self, server_round, replies):  # noqa: D102
        arrays, metrics = super().aggregate_train(server_round, replies)
        return self.change({k: a.numpy() for k, a in arrays.items()}), metrics


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: array_record({"w": m["w"]}), "missing ['b']"),
    (lambda m: array_record({**m, "w": m["w"].T.copy()}), "'w' is float32[2, 3], the global model has float32[3, 2]"),
    (lambda m: array_record({**m, "b": np.full(2, np.nan, np.float32)}), "'b' holds NaN or infinite values"),
    (lambda m: m, "it is a dict, not an ArrayRecord"),
])
def test_a_malformed_new_global_model_fails_the_round_naming_the_strategy(change, message):
    strategy = validated(Broken(change))
    with pytest.raises(RunFailed, match="round 1: Broken.aggregate_train returned a new global model unlike the old one") as err:
        strategy.aggregate_train(1, [train_reply(1, update(1.0))])
    assert message in str(err.value)
