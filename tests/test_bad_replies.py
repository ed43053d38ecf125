"""One client's malformed replies, through the real round loop: the round goes on without them,
metrics.json says why, and a round whose every reply is bad fails with a message, not a traceback.

Real round loop, strategies and ClientApp code on ``RogueGrid``: a LocalGrid whose node 1 sends,
in place of its honest reply, what a test's ``forge`` makes of it (as a modified client could)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedweights.config import RunConfig, StrategyConfig
from fedweights.errors import RunFailed
from fedweights.flower.round_loop import run_federation
from fedweights.flower.runtime import Runtime
from fedweights.progress import RichReporter
from fedweights.run_dir import RunDir
from fedweights.task import builtin_task, save_task

from .local_grid import LocalGrid, node_configs

pytestmark = pytest.mark.usefixtures("serverapp_process")


class RogueGrid(LocalGrid):
    """A LocalGrid whose ``rogue`` nodes replace their honest replies of ``kind`` by ``forge(reply)``
    (a RecordDict made from the honest reply), and whose replies list the rogue ones first."""

    def __init__(self, runtime, configs, forge, kind="train", rogue=(1,)) -> None:
        super().__init__(runtime, configs)
        self.forge, self.kind, self.rogue = forge, kind, set(rogue)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102 - Grid API
        replies = super().send_and_receive(messages, timeout=timeout)
        forged = [
            Message(self.forge(r), reply_to=m)
            if m.metadata.dst_node_id in self.rogue and m.metadata.message_type == self.kind and not r.has_error()
            else r
            for m, r in zip(messages, replies, strict=True)
        ]  # replies come in any order: the rogue's first (Flower's strategies take the layout of the first)
        return sorted(forged, key=lambda r: r.metadata.src_node_id not in self.rogue)


def federate(tmp_path, forge, kind="train", rogue=(1,), strategy="fedavg", nodes=3, rounds=2, model_fn=None) -> dict:
    config = RunConfig(clients=nodes, rounds=rounds, out=str(tmp_path / "run"), strategy=StrategyConfig(name=strategy))
    task_file = None
    if model_fn is not None:  # the digits data with another model, as the Python API runs it
        task_file = str(save_task(dataclasses.replace(builtin_task(config), model_fn=model_fn), tmp_path / "task.pkl"))
    grid = RogueGrid(Runtime(config, task_file), node_configs(nodes), forge, kind, rogue)
    run_federation(grid, Runtime(config, task_file), reporter=RichReporter())
    return RunDir(config.out).read_metrics()


def arrays_and_metrics(reply: Message) -> tuple[dict[str, np.ndarray], dict]:
    arrays = next(iter(reply.content.array_records.values()))
    return {k: a.numpy() for k, a in arrays.items()}, dict(next(iter(reply.content.metric_records.values())))


def renamed_records(reply):
    arrays, metrics = arrays_and_metrics(reply)
    return RecordDict({"weights": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "stats": MetricRecord(metrics)})


def reversed_keys(reply):
    arrays, metrics = arrays_and_metrics(reply)
    return RecordDict({"arrays": ArrayRecord({k: Array(arrays[k]) for k in reversed(arrays)}), "metrics": MetricRecord(metrics)})


def payload_unlike_its_header(reply):
    arrays, metrics = arrays_and_metrics(reply)
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    key, first = next(iter(arrays.items()))
    data = io.BytesIO()
    np.save(data, np.zeros(first.size + 5, first.dtype), allow_pickle=False)
    record[key] = Array(dtype=str(first.dtype), shape=tuple(first.shape), stype="numpy.ndarray", data=data.getvalue())
    return RecordDict({"arrays": record, "metrics": MetricRecord(metrics)})


def list_loss(reply):
    arrays, metrics = arrays_and_metrics(reply)
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "metrics": MetricRecord({**metrics, "train_loss": [1.0, 2.0]})})  # fmt: skip


def huge_weights(reply):
    """Finite, but 1e30 times the trained weights: averaged in, the next round trains on NaNs."""
    arrays, metrics = arrays_and_metrics(reply)
    return RecordDict({"arrays": ArrayRecord({k: Array(v * np.float32(1e30)) for k, v in arrays.items()}),
                       "metrics": MetricRecord(metrics)})  # fmt: skip


def shifted_weights(reply):
    """Every weight + 2: ~30x the honest updates' norm, but within 100x the model's own norm."""
    arrays, metrics = arrays_and_metrics(reply)
    return RecordDict({"arrays": ArrayRecord({k: Array(v + np.float32(2)) for k, v in arrays.items()}),
                       "metrics": MetricRecord(metrics)})  # fmt: skip


@pytest.mark.parametrize(
    ("strategy", "forge", "reason"),
    [
        ("fedavg", renamed_records, None),  # accepted under the round's usual record names
        ("fedavgm", reversed_keys, None),  # aggregated by key, not by position
        ("krum", payload_unlike_its_header, "declares float32"),
        ("median", list_loss, "metric keys ['num-examples', 'train_loss[2]'] differ"),
        ("fedavg", shifted_weights, "x the round's median update norm"),  # default max_norm_ratio
        ("fedavg", huge_weights, "x the global model's norm"),  # default max_model_norm_ratio
    ],
)
def test_one_clients_odd_reply_never_takes_the_round_down(tmp_path, strategy, forge, reason):
    metrics = federate(tmp_path, forge, strategy=strategy)
    assert metrics["status"] == "completed" and len(metrics["rounds"]) == 2
    for record in metrics["rounds"]:
        if reason is None:  # a harmless layout: the update is used
            assert record["failures"] == [] and record["num_clients"] == 3
        else:
            (failure,) = record["failures"]
            assert failure["node"] == "1" and failure["reason"].startswith("update rejected: ")
            assert reason in failure["reason"] and record["num_clients"] == 2


def test_with_two_sites_a_huge_update_is_excluded_by_the_model_norm_bound(tmp_path):
    """Too few updates for the median screen: averaged in, node 1's update ended the run in round 2."""
    metrics = federate(tmp_path, huge_weights, nodes=2)
    assert metrics["status"] == "completed" and len(metrics["rounds"]) == 2
    for record in metrics["rounds"]:
        (failure,) = record["failures"]
        assert failure["node"] == "1" and "x the global model's norm" in failure["reason"]
        assert record["num_clients"] == 1 and record["eval_accuracy"] > 0.3


def batch_norm_mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def far_running_statistics(reply):
    """BatchNorm statistics far from the global model's, as a large shard's were (honest updates
    with a norm of 4,508 over 30 Fashion-MNIST clients, against a median of 14 without them)."""
    arrays, metrics = arrays_and_metrics(reply)
    arrays["1.running_var"] = arrays["1.running_var"] + np.float32(1e4)
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord(metrics)})


def test_batchnorm_statistics_are_not_mistaken_for_a_huge_update(tmp_path):
    """The norm screens measure the learnt weights: a model's buffers follow the data, not the gradient."""
    metrics = federate(tmp_path, far_running_statistics, model_fn=batch_norm_mlp)
    assert metrics["status"] == "completed"
    assert [(r["num_clients"], r["failures"]) for r in metrics["rounds"]] == [(3, []), (3, [])]


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"eval_accuracy": float("nan")}, "metric 'eval_accuracy' must hold finite numbers, got nan"),
        ({"eval_accuracy": 7.0}, "metric 'eval_accuracy' must lie in [0, 1], got 7.0"),
        ({"eval_loss": -1.0}, "metric 'eval_loss' must not be negative"),
        ({"num-examples": -50}, "'num-examples' must be a non-negative finite number, got -50"),
        ({"eval_accuracy": [0.5, 0.5]}, "metric keys"),
    ],
)
def test_a_bad_evaluation_reply_is_left_out_and_reported(tmp_path, values, reason):
    def forge(reply):
        _, metrics = next(iter(reply.content.metric_records.items()))
        return RecordDict({"metrics": MetricRecord({**dict(metrics), **values})})

    metrics = federate(tmp_path, forge, kind="evaluate", rounds=1)
    (record,) = metrics["rounds"]
    assert metrics["status"] == "completed" and record["num_clients"] == 3
    (failure,) = record["failures"]
    assert failure["node"] == "1" and failure["reason"].startswith("evaluation rejected: ") and reason in failure["reason"]
    assert 0.0 <= record["eval_accuracy"] <= 1.0 and record["eval_loss"] >= 0.0  # from the two honest nodes


def test_an_evaluation_reply_in_a_renamed_record_still_counts(tmp_path):
    def forge(reply):
        return RecordDict({"results": next(iter(reply.content.metric_records.values()))})

    (record,) = federate(tmp_path, forge, kind="evaluate", rounds=1)["rounds"]
    assert record["failures"] == [] and 0.0 <= record["eval_accuracy"] <= 1.0


def test_a_round_whose_every_update_is_bad_fails_with_the_reasons(tmp_path):
    with pytest.raises(RunFailed, match=r"round 1 got 0 usable update\(s\) of 2 sent; at least 1 needed") as info:
        federate(tmp_path, payload_unlike_its_header, rogue=(1, 2), nodes=2)
    assert "node 1: update rejected: " in str(info.value) and "node 2: update rejected: " in str(info.value)
    assert "but its data is float32" in str(info.value) and "no round completed" in str(info.value)
    metrics = RunDir(tmp_path / "run").read_metrics()
    assert metrics["status"] == "failed" and "but its data is float32" in metrics["error"]


def test_a_client_that_fails_its_evaluation_is_listed_in_the_rounds_failures(tmp_path):
    """A client crashing in evaluation (an error reply) left no trace in metrics.json."""
    from flwr.app import Error

    class EvaluationCrashGrid(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):  # noqa: D102 - Grid API
            replies = super().send_and_receive(messages, timeout=timeout)
            return [Message(Error(code=0, reason="ValueError: out of memory in evaluate"), reply_to=m)
                    if m.metadata.dst_node_id == 1 and m.metadata.message_type == "evaluate" else r
                    for m, r in zip(messages, replies, strict=True)]  # fmt: skip

    config = RunConfig(clients=3, rounds=1, out=str(tmp_path / "run"))
    run_federation(EvaluationCrashGrid(Runtime(config), node_configs(3)), Runtime(config), reporter=RichReporter())
    (record,) = RunDir(config.out).read_metrics()["rounds"]
    assert record["num_clients"] == 3 and record["eval_accuracy"] is not None  # training used all three
    assert record["failures"] == [{"node": "1", "reason": "evaluation failed: ValueError: out of memory in evaluate"}]
