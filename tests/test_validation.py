"""Update validation: bad updates are excluded with a reason before any strategy aggregates them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian, Krum

from fedweights.errors import RunFailed
from fedweights.strategies import ValidatedStrategy, rejected_updates
from fedweights.strategies.reply_checks import learnt_weights, update_norm
from fedweights.strategies.validation import model_norm_outliers, norm_outliers

from .flower_messages import NodesGrid, array_record, error_reply, metadata, train_reply

GLOBAL = {"w": np.zeros((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


def update(value: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) for k, v in GLOBAL.items()}


def with_array(reply, key: str, array: Array):
    """``reply`` with its array ``key`` replaced by ``array`` (as a modified client could send it)."""
    reply.content["arrays"][key] = array
    return reply


def encoded(declared_dtype: str, declared_shape: tuple, payload: np.ndarray | None = None, data: bytes = b"") -> Array:
    """An Array whose header says ``declared_dtype[declared_shape]`` and whose data is ``payload``."""
    if payload is not None:
        buffer = io.BytesIO()
        np.save(buffer, payload, allow_pickle=False)
        data = buffer.getvalue()
    return Array(dtype=declared_dtype, shape=declared_shape, stype="numpy.ndarray", data=data)


def validated(
    inner=None, max_norm=None, max_norm_ratio=None, max_examples=None, max_model_norm_ratio=None, global_arrays=GLOBAL,
    buffer_keys=(),
) -> ValidatedStrategy:
    strategy = ValidatedStrategy(
        inner or FedAvg(min_available_nodes=1), max_norm=max_norm, max_norm_ratio=max_norm_ratio,
        max_examples=max_examples, max_model_norm_ratio=max_model_norm_ratio, buffer_keys=buffer_keys,
    )
    list(strategy.configure_train(1, array_record(global_arrays), ConfigRecord(), NodesGrid([1, 2])))
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
    (with_array(train_reply(20, update(0.1)), "w", encoded("float32", (3, 2), np.ones(11, np.float32))),
     "'w' declares float32[3, 2] but its data is float32[11]"),
    (with_array(train_reply(21, update(0.1)), "w", encoded("float32", (3, 2), np.ones((3, 2), np.float64))),
     "'w' declares float32[3, 2] but its data is float64[3, 2]"),
    (with_array(train_reply(22, update(0.1)), "w", encoded("float32", (3, 2), data=b"not numpy")),
     "'w' cannot be decoded as a numpy array"),
    (train_reply(23, update(0.1), train_loss=[0.1, 0.2]), "metric keys ['num-examples', 'train_loss[2]'] differ"),
    (train_reply(24, update(0.1), train_loss=float("nan")), "metric 'train_loss' must hold finite numbers, got nan"),
    (train_reply(25, update(0.1), train_loss=-4.0), "metric 'train_loss' must not be negative"),
    (train_reply(26, update(0.1), num_examples=1e300), "'num-examples' is 1e+300, more than the largest accepted"),
    (train_reply(27, update(0.1), num_examples=10**30), "'num-examples' is 1e+30, more than the largest accepted"),
    (train_reply(28, update(0.1), num_examples=-5), "'num-examples' must be a positive finite number, got -5"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_UPDATES)
def test_a_bad_update_is_excluded_with_its_reason_and_the_round_still_aggregates(bad, reason):
    strategy = validated()
    good = [train_reply(1, update(1.0)), train_reply(2, update(3.0))]
    arrays, metrics = strategy.aggregate_train(1, [bad, *good])  # first: Flower's strategies copy its layout
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


def test_an_update_far_larger_than_the_rounds_median_is_excluded_and_the_others_averaged():
    strategy = validated(max_norm_ratio=10.0)
    replies = [train_reply(n, update(v)) for n, v in [(1, 0.1), (2, 0.2), (3, 0.3), (4, 3e37)]]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), 0.2, rtol=1e-6)  # the three honest updates, equal weights
    (rejection,) = rejected_updates(strategy, 1)
    assert rejection["node"] == "4"
    assert rejection["reason"].startswith("update rejected: update norm 8.485e+37 is 1.2e+38x the round's median update norm 0.7071 ")
    assert "(max_norm_ratio 10;" in rejection["reason"]


def test_the_median_is_taken_over_the_updates_that_passed_the_other_checks():
    """Three broken replies must not pull the median down and get the two real updates rejected."""
    strategy = validated(max_norm_ratio=10.0)
    broken = [train_reply(n, update(0.0), train_loss=float("nan")) for n in (5, 6, 7)]
    arrays, _ = strategy.aggregate_train(1, [*broken, train_reply(1, update(1.0)), train_reply(2, update(3.0))])
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)
    assert sorted(r["node"] for r in rejected_updates(strategy, 1)) == ["5", "6", "7"]


@pytest.mark.parametrize(
    ("norms", "ratio", "expected"),
    [
        ([1.0, 2.0, 20.0], 10.0, [False, False, False]),  # exactly 10x the median 2 is accepted
        ([1.0, 2.0, 20.1], 10.0, [False, False, True]),
        ([1.0, 1e9], 10.0, [False, False]),  # two updates: no majority to judge by
        ([0.0, 0.0, 0.0, 5.0], 10.0, [False] * 4),  # median 0: no scale to judge by
        ([1.0, 2.0, 20.1], None, [False] * 3),  # off
        ([1.0, 1.0, 1.5, 1.5], 1.2, [False, False, False, False]),  # median 1.25; 1.5 = 1.2x
    ],
)
def test_norm_outliers(norms, ratio, expected):
    assert [reason is not None for reason in norm_outliers(norms, ratio)] == expected


ONES = {k: np.ones_like(v) for k, v in GLOBAL.items()}  # norm sqrt(8) = 2.828


def moved(value: float) -> dict[str, np.ndarray]:
    return {k: v + np.float32(value) for k, v in ONES.items()}


def test_with_two_updates_the_one_far_larger_than_the_model_is_excluded():
    """Two sites: the median screen cannot tell which update is odd, the model's own norm can."""
    strategy = validated(max_norm_ratio=10.0, max_model_norm_ratio=100.0, global_arrays=ONES)
    arrays, _ = strategy.aggregate_train(1, [train_reply(1, moved(0.5)), train_reply(2, moved(1e30))])
    np.testing.assert_allclose(arrays["w"].numpy(), 1.5)  # the honest update alone
    (rejection,) = rejected_updates(strategy, 1)
    assert rejection["node"] == "2" and rejection["reason"].startswith(
        "update rejected: update norm 2.828e+30 is 1e+30x the global model's norm 2.828 (max_model_norm_ratio 100;")


def test_absurd_updates_are_excluded_before_the_median_is_taken():
    """Two absurd updates of three would set the round's median and pass the median screen."""
    strategy = validated(max_norm_ratio=10.0, max_model_norm_ratio=100.0, global_arrays=ONES)
    replies = [train_reply(1, moved(0.5)), train_reply(2, moved(1e30)), train_reply(3, moved(2e30))]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), 1.5)
    assert sorted(r["node"] for r in rejected_updates(strategy, 1)) == ["2", "3"]


def test_when_every_update_is_over_the_model_bound_none_is_excluded(caplog):
    """Every client far from a model gone bad: rejecting them all would end the run."""
    strategy = validated(max_model_norm_ratio=100.0, global_arrays=ONES)
    arrays, _ = strategy.aggregate_train(1, [train_reply(1, moved(300.0)), train_reply(2, moved(500.0))])
    np.testing.assert_allclose(arrays["w"].numpy(), 401.0)
    assert rejected_updates(strategy, 1) == []
    assert "none is rejected for it" in caplog.text


@pytest.mark.parametrize(
    ("norms", "model_norm", "ratio", "expected"),
    [
        ([1.0, 2.0, 200.0], 2.0, 100.0, [False, False, False]),  # exactly 100x the model's norm is accepted
        ([1.0, 2.0, 200.1], 2.0, 100.0, [False, False, True]),
        ([1.0, 1e9], 2.0, 100.0, [False, True]),  # no peers needed
        ([1e9], 2.0, 100.0, [False]),  # every update over the bound (here the only one): none judged
        ([300.0, 400.0], 2.0, 100.0, [False, False]),
        ([1.0, 1e9], 2.0, None, [False, False]),  # off
        ([0.5, 1.5], 2.0, 0.5, [False, True]),  # a bound below the model's own norm
        ([], 2.0, 100.0, []),
        # a model of 10,000 weights whose norm is below 0.01 per weight (0.01 * 100 = 1): judged by 1
        ([1.0, 100.0, 100.1], 0.0, 100.0, [False, False, True]),
        ([1.0, 100.0, 100.1], 0.5, 100.0, [False, False, True]),
    ],
)
def test_model_norm_outliers(norms, model_norm, ratio, expected):
    assert [reason is not None for reason in model_norm_outliers(norms, model_norm, 10_000, ratio)] == expected


def test_a_model_near_zero_is_judged_by_a_least_scale_per_weight():
    """A zero-initialised linear model: its norm (the biases) is no scale for its first updates."""
    honest, absurd = model_norm_outliers([10.2, 1e4], 0.075, 7850, 100.0)
    assert honest is None  # 136x the model's norm (measured: Fashion-MNIST, 5 local epochs)
    assert absurd.startswith("update norm 1e+04 is 1.13e+04x 0.886 = 0.01 per weight, the scale used when the "
                             "global model's norm (0.075) is smaller (max_model_norm_ratio 100;")


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
    (lambda m: array_record({**m, "b": np.full(2, 1e39)}), "'b' holds NaN or infinite values"),  # float64 → float32: inf
])
def test_a_malformed_new_global_model_fails_the_round_naming_the_strategy(change, message):
    strategy = validated(Broken(change))
    with pytest.raises(RunFailed, match="round 1: Broken.aggregate_train returned a new global model unlike the old one") as err:
        strategy.aggregate_train(1, [train_reply(1, update(1.0))])
    assert message in str(err.value)


def reply_with(node: int, arrays: dict[str, np.ndarray], array_name="arrays", metric_name="metrics") -> Message:
    """A train reply whose records have the given names and whose arrays come in the given order."""
    content = RecordDict({array_name: array_record(arrays), metric_name: MetricRecord({"train_loss": 0.5, "num-examples": 10})})
    return Message(content=content, metadata=metadata(node))


@pytest.mark.parametrize("inner", [FedAvg, FedAvgM, FedMedian, Krum])
def test_a_reply_with_its_own_record_names_is_aggregated_not_fatal(inner):
    """Flower's strategies read every reply under the FIRST reply's record names (and raised)."""
    strategy = validated(inner(min_available_nodes=1))
    odd = reply_with(1, update(2.0), array_name="weights", metric_name="stats")
    arrays, metrics = strategy.aggregate_train(1, [odd, train_reply(2, update(2.0)), train_reply(3, update(2.0))])
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)
    assert rejected_updates(strategy, 1) == [] and metrics["train_loss"] == 0.5


def test_fedavgm_pairs_arrays_by_key_whatever_order_the_first_reply_lists_them():
    """FedAvgM zips the global arrays with the aggregate's by position, in the first reply's order."""
    strategy = validated(FedAvgM(min_available_nodes=1, server_momentum=0.0))
    swapped = reply_with(1, {"b": np.full(2, 1.0, np.float32), "w": np.full((3, 2), 1.0, np.float32)})
    arrays, _ = strategy.aggregate_train(1, [swapped, train_reply(2, update(1.0))])
    assert list(arrays) == ["w", "b"]
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0)


def test_krum_is_not_fooled_by_an_attacker_that_reorders_its_arrays():
    """Krum flattens each reply's arrays in the reply's own order: listing 'b' first, an attacker
    whose real model swaps the layers looked like the honest ones and was chosen as the new model."""
    global_model = {"w": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)}
    strategy = ValidatedStrategy(Krum(min_available_nodes=1, num_malicious_nodes=1))
    list(strategy.configure_train(1, array_record(global_model), ConfigRecord(), NodesGrid(range(1, 6))))
    honest = [train_reply(n, {"w": np.full(4, 1 + 0.01 * n, np.float32), "b": np.full(4, 9 + 0.01 * n, np.float32)})
              for n in range(1, 5)]  # fmt: skip
    attacker = reply_with(9, {"b": np.full(4, 1.025, np.float32), "w": np.full(4, 9.025, np.float32)})
    arrays, _ = strategy.aggregate_train(1, [attacker, *honest])
    assert arrays["w"].numpy()[0] < 2 and arrays["b"].numpy()[0] > 8  # an honest model, not the swapped one


def evaluation_reply(node: int, name="metrics", **metrics) -> Message:
    values = {"eval_loss": 0.4, "eval_accuracy": 0.9, "num-examples": 10, **metrics}
    return Message(content=RecordDict({name: MetricRecord(values)}), metadata=metadata(node))


BAD_EVALUATIONS = [
    (evaluation_reply(11, eval_accuracy=float("nan")), "metric 'eval_accuracy' must hold finite numbers, got nan"),
    (evaluation_reply(12, eval_accuracy=1.5), "metric 'eval_accuracy' must lie in [0, 1], got 1.5"),
    (evaluation_reply(13, eval_loss=-2.0), "metric 'eval_loss' must not be negative, got -2.0"),
    (evaluation_reply(14, eval_loss=float("inf")), "metric 'eval_loss' must hold finite numbers, got inf"),
    (evaluation_reply(15, **{"num-examples": -10}), "'num-examples' must be a non-negative finite number, got -10"),
    (evaluation_reply(16, **{"num-examples": 1e200}), "'num-examples' is 1e+200, more than the largest accepted"),
    (evaluation_reply(17, eval_accuracy=[0.5, 0.5]), "metric keys ['eval_accuracy[2]', 'eval_loss', 'num-examples'] differ"),
    (Message(content=RecordDict({"metrics": MetricRecord({"eval_loss": 0.4, "num-examples": 10})}), metadata=metadata(18)),
     "metric keys ['eval_loss', 'num-examples'] differ from the other clients' ['eval_accuracy', 'eval_loss', 'num-examples']"),
    (Message(content=RecordDict({"metrics": MetricRecord({"eval_loss": 0.4, "eval_accuracy": 0.9})}), metadata=metadata(19)),
     "'num-examples' must be a non-negative finite number, got None"),
    (Message(content=RecordDict(), metadata=metadata(20)), "expected one MetricRecord, got 0"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_EVALUATIONS)
def test_a_bad_evaluation_reply_is_excluded_with_its_reason(bad, reason):
    strategy = validated()
    metrics = strategy.aggregate_evaluate(1, [bad, evaluation_reply(1), evaluation_reply(2, eval_accuracy=0.7)])
    assert metrics["eval_accuracy"] == pytest.approx(0.8) and metrics["eval_loss"] == pytest.approx(0.4)
    (rejection,) = strategy.rejected_evaluation[1]
    assert rejection["node"] == str(bad.metadata.src_node_id)
    assert rejection["reason"].startswith("evaluation rejected: ") and reason in rejection["reason"]


def test_a_site_reporting_an_extra_metric_still_counts_without_it():
    """Two sites, one (say, on a newer client) reporting a metric the other does not: whichever
    replied first set the round's keys, and the other's update was rejected."""
    for first, second in [(1, 2), (2, 1)]:
        replies = {1: train_reply(1, update(1.0), grad_norm=2.5), 2: train_reply(2, update(3.0))}
        strategy = validated()
        arrays, metrics = strategy.aggregate_train(1, [replies[first], replies[second]])
        np.testing.assert_allclose(arrays["w"].numpy(), 2.0)  # both updates
        assert rejected_updates(strategy, 1) == [] and set(metrics) == {"train_loss"}  # FedAvg's average, no extra
    strategy = validated()
    metrics = strategy.aggregate_evaluate(1, [evaluation_reply(1, extra=1.0), evaluation_reply(2, eval_accuracy=0.7)])
    assert metrics["eval_accuracy"] == pytest.approx(0.8) and strategy.rejected_evaluation[1] == []


def test_a_minority_lacking_the_usual_metrics_is_still_rejected():
    strategy = validated()
    bare = Message(content=RecordDict({"arrays": array_record(update(9.0)), "metrics": MetricRecord({"num-examples": 10})}),
                   metadata=metadata(3))
    arrays, _ = strategy.aggregate_train(1, [bare, train_reply(1, update(1.0)), train_reply(2, update(3.0))])
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)
    (rejection,) = rejected_updates(strategy, 1)
    assert rejection["node"] == "3" and "differ from the other clients' ['num-examples', 'train_loss']" in rejection["reason"]


def test_evaluation_replies_without_examples_are_left_out_and_all_empty_gives_no_metrics():
    strategy = validated()
    empty = [evaluation_reply(n, eval_loss=0.0, eval_accuracy=0.0, **{"num-examples": 0}) for n in (1, 2)]
    assert strategy.aggregate_evaluate(1, empty) is None  # Flower divided by a zero total
    metrics = strategy.aggregate_evaluate(2, [*empty, evaluation_reply(3, name="results")])
    assert metrics["eval_accuracy"] == pytest.approx(0.9) and strategy.rejected_evaluation[2] == []


def test_a_client_claiming_more_examples_than_max_examples_gets_no_weight():
    """FedAvg weighs by the clients' own counts: a claim of 10^12 examples would set the model alone."""
    strategy = validated(max_examples=400)
    honest = [train_reply(1, update(1.0), num_examples=400), train_reply(2, update(2.0), num_examples=200)]
    arrays, _ = strategy.aggregate_train(1, [*honest, train_reply(3, update(-50.0), num_examples=1e12)])
    np.testing.assert_allclose(arrays["w"].numpy(), (400 * 1.0 + 200 * 2.0) / 600)
    assert [r["reason"] for r in rejected_updates(strategy, 1)] == [
        "update rejected: 'num-examples' is 1e+12, more than max_examples 400"
    ]
    metrics = strategy.aggregate_evaluate(1, [evaluation_reply(1), evaluation_reply(3, eval_accuracy=0.0, **{"num-examples": 401})])
    assert metrics["eval_accuracy"] == pytest.approx(0.9)
    assert [r["reason"] for r in strategy.rejected_evaluation[1]] == [
        "evaluation rejected: 'num-examples' is 401, more than max_examples 400"
    ]


def test_update_norm_is_the_float64_norm_of_the_whole_difference():
    rng = np.random.default_rng(3)
    reference = {"w": rng.standard_normal((30, 20)).astype(np.float32), "b": np.zeros(20, np.float32),
                 "huge": np.full(3, -1e200)}  # float64 values whose squares overflow
    values = {"w": reference["w"] + np.float32(0.5), "b": np.ones(20, np.float32), "huge": np.full(3, 1e200)}
    expected = [v.astype(np.float64) - reference[k].astype(np.float64) for k, v in values.items()]
    scale = 1e200  # np.linalg.norm of the concatenation would overflow
    np.testing.assert_allclose(update_norm(values, reference) / scale,
                               np.linalg.norm(np.concatenate([e.ravel() / scale for e in expected])), rtol=1e-12)


BN_GLOBAL = {
    "w": np.ones((3, 2), np.float32),
    "bn.running_var": np.ones(2, np.float32),
    "bn.num_batches_tracked": np.array(0, np.int64),
}
BN_BUFFERS = ("bn.running_var", "bn.num_batches_tracked")


def trained_for(steps: int, value: float = 0.5, variance: float = 1.0) -> dict[str, np.ndarray]:
    """``BN_GLOBAL`` moved by ``value`` per weight after ``steps`` batches of data of ``variance``."""
    return {"w": BN_GLOBAL["w"] + np.float32(value), "bn.running_var": np.full(2, variance, np.float32),
            "bn.num_batches_tracked": np.array(steps, np.int64)}


def test_integer_arrays_and_buffers_are_not_part_of_an_update_norm():
    """BatchNorm's num_batches_tracked grows by a client's step count: in the norm, a client with a
    large shard looked 800x farther from the model than one with a small shard."""
    assert update_norm(trained_for(800), BN_GLOBAL) == pytest.approx(0.5 * np.sqrt(6))
    assert update_norm(trained_for(800, variance=3.0), BN_GLOBAL, skip=BN_BUFFERS) == pytest.approx(0.5 * np.sqrt(6))
    assert set(learnt_weights(trained_for(800), skip=BN_BUFFERS)) == {"w"}


def test_a_client_with_many_more_steps_or_other_statistics_is_not_mistaken_for_an_outlier():
    strategy = validated(max_norm=2.0, max_norm_ratio=10.0, max_model_norm_ratio=100.0, global_arrays=BN_GLOBAL,
                         buffer_keys=BN_BUFFERS)
    replies = [train_reply(1, trained_for(2)), train_reply(2, trained_for(3)), train_reply(3, trained_for(822, variance=1e4))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert rejected_updates(strategy, 1) == []
    np.testing.assert_allclose(arrays["w"].numpy(), 1.5)
