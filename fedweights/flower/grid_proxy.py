"""``GridProxy``: a Flower ``Grid`` that hands every call to the Grid it wraps.

The round loop's Grid wrappers (``BoundedNodeWait``, ``FastPollGrid``) subclass it and replace
only the one method they change.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class GridProxy(Grid):
    """Delegates the whole Grid API (and any engine-specific attribute) to ``grid``."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run) -> None:  # noqa: D102 - Grid API
        self.grid.set_run(run)

    @property
    def run(self):  # noqa: D102 - Grid API
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: D102 - Grid API
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102 - Grid API
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102 - Grid API
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102 - Grid API
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Delegated."""
        return self.grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str):
        if name == "grid":  # not set yet (copy, unpickle): no endless recursion
            raise AttributeError(name)
        return getattr(self.grid, name)  # anything engine-specific the wrapped grid offers
