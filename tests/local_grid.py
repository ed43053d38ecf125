"""``LocalGrid``: a real Flower ``Grid`` whose nodes are fedweights' ClientApp handlers in this process.

Each node has its own Flower Context (kept across rounds, e.g. a DP accountant) and node config,
and an exception in a handler becomes an error reply, as Flower does with a failing ClientApp. The
round loop, strategies and ClientApp code run unmodified; a federation takes seconds, no Ray.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedweights.flower.client_app import evaluate_reply, query_reply, train_reply
from fedweights.flower.runtime import NUM_PARTITIONS, PARTITION_ID, Runtime

HANDLERS = {"train": train_reply, "evaluate": evaluate_reply, "query": query_reply}


HANDLERS = {"train": train_reply, "evaluate": evaluate_reply, "query": query_reply}


class LocalGrid(Grid):
    """A Grid whose nodes are fedweights ClientApp handlers called in this process."""

    def __init__(self, runtime: Runtime, node_configs: dict[int, dict]) -> None:
        self.runtime = runtime
        self.node_configs = node_configs
        self.contexts: dict[int, Context] = {}  # one per node, kept across rounds (e.g. a DP accountant)

    def set_run(self, run):  # noqa: D102 - Grid API
        self._run = run

    @property
    def run(self):  # noqa: D102 - Grid API
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return Message(content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self):  # noqa: D102 - Grid API
        return list(self.node_configs)

    def push_messages(self, messages):  # noqa: D102 - not needed by the round loop
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: D102 - not needed by the round loop
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102 - Grid API
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            context = self.contexts.setdefault(node, Context(1, node, {}, RecordDict(), {}))
            context.node_config = self.node_configs[node]
            try:
                replies.append(HANDLERS[msg.metadata.message_type](msg, context, self.runtime))
            except Exception as exc:  # what Flower does with an exception in a ClientApp
                replies.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        return replies


class FaultyGrid(LocalGrid):
    """A LocalGrid whose nodes misbehave as a test asks.

    ``crash_once``: (node, round) pairs whose first train message of that round fails, as a
    ClientApp that raises (an error reply). ``die_in_round``: node → round in which the node dies
    while training: it never replies and is no longer connected.
    """

    def __init__(self, runtime, node_configs, crash_once=(), die_in_round=None) -> None:
        super().__init__(runtime, node_configs)
        self.crash_once = set(crash_once)
        self.die_in_round = dict(die_in_round or {})
        self.dead: set[int] = set()

    def get_node_ids(self):  # noqa: D102 - Grid API
        return [n for n in self.node_configs if n not in self.dead]

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102 - Grid API
        delivered, failed = [], []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            server_round = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
            if kind == "train" and self.die_in_round.get(node) == server_round:
                self.dead.add(node)
            if node in self.dead:
                continue  # no reply within the timeout
            if kind == "train" and (node, server_round) in self.crash_once:
                self.crash_once.discard((node, server_round))
                failed.append(Message(Error(code=0, reason="RuntimeError: out of memory"), reply_to=msg))
                continue
            delivered.append(msg)
        return super().send_and_receive(delivered, timeout=timeout) + failed


def node_configs(count: int) -> dict[int, dict]:
    """Node id → node config for ``count`` nodes with partitions 0..count-1."""
    return {n: {PARTITION_ID: n - 1, NUM_PARTITIONS: count} for n in range(1, count + 1)}


SERVERAPP_IDENTITY = (("_run_id", 1), ("_node_id", 0), ("_task_id", 1))
"""What Flower sets on ``TaskIdentity`` in a ServerApp process before messages can be created."""


def act_as_serverapp_process(setattr_=setattr) -> None:
    """Set the ServerApp identity (through ``setattr_``, e.g. a monkeypatch's) and one torch thread,
    as each simulated client gets (tiny models on a busy machine crawl otherwise)."""
    import torch
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in SERVERAPP_IDENTITY:
        setattr_(TaskIdentity, attr, value)
    torch.set_num_threads(1)
