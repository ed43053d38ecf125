"""Build real Flower reply Messages and a small Grid for strategy tests without a running federation."""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


def metadata(node: int) -> Metadata:
    """Metadata of a train reply sent by ``node``."""
    return Metadata(
        run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=60.0, message_type="train",
    )  # fmt: skip


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding ``arrays`` under their names."""
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def train_reply(node: int, arrays: dict[str, np.ndarray], num_examples: float = 10, **metrics: float) -> Message:
    """A client's train reply: its arrays plus ``num-examples`` and ``metrics``."""
    content = RecordDict(
        {
            "arrays": array_record(arrays),
            "metrics": MetricRecord({"train_loss": 0.5, "num-examples": num_examples, **metrics}),
        }
    )
    return Message(content=content, metadata=metadata(node))


def error_reply(node: int, reason: str = "client crashed") -> Message:
    """A reply carrying an error instead of content."""
    return Message(error=Error(code=1, reason=reason), metadata=metadata(node))


class NodesGrid(Grid):
    """A Grid that only knows its node ids (enough for strategies' ``configure_*``)."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)
        # Instruction messages take their sender from the process's task identity, as in a ServerApp.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.node_ids

    @property
    def run(self):  # noqa: D102
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # noqa: D102
        raise NotImplementedError

    def push_messages(self, messages):  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: D102
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        raise NotImplementedError

    def set_run(self, run_id):  # noqa: D102
        raise NotImplementedError
