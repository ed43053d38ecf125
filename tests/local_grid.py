"""``LocalGrid``: a real Flower ``Grid`` whose nodes are fedweights' ClientApp handlers in this process.

Each node has its own Flower Context (kept across rounds, e.g. a DP accountant) and node config,
and an exception in a handler becomes an error reply, as Flower does with a failing ClientApp. The
round loop, strategies and ClientApp code run unmodified; a federation takes seconds, no Ray.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedweights.flower.client_app import evaluate_reply, query_reply, train_reply
from fedweights.flower.runtime import Runtime

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
