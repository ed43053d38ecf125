"""A bounded wait for nodes: Flower strategies wait forever until enough nodes are connected.

Flower's ``sample_nodes`` (used by every built-in strategy's ``configure_train`` and
``configure_evaluate``) polls ``grid.get_node_ids()`` once a second until ``min_available_nodes``
nodes are connected, with no time limit: a client that dies for good hangs the run. The round loop
hands strategies a ``BoundedNodeWait`` grid instead; while a round is configured inside
``waiting(round_timeout, needed)``, a poll that still sees fewer than ``needed`` nodes after
``round_timeout`` seconds raises ``NodeWaitTimeout`` (a ``RunFailed``), which the round loop treats
like any failed round (stop or retry, see ``RunConfig.on_round_timeout``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

from flwr.serverapp import Grid

from ..errors import RunFailed
from .grid_proxy import GridProxy


class NodeWaitTimeout(RunFailed):
    """Fewer nodes than a round needs were connected after ``round_timeout`` seconds."""


class BoundedNodeWait(GridProxy):
    """A Grid that delegates to ``grid`` and bounds how long a caller polls it for enough nodes."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self._deadline: float | None = None
        self._needed = 0
        self._timeout = 0.0
        self._what = ""

    @contextlib.contextmanager
    def waiting(self, timeout: float, needed: int, what: str) -> Iterator[None]:
        """Within this block, polls for node ids fail once ``timeout`` seconds have passed with
        fewer than ``needed`` nodes connected. ``what`` names the step in the message."""
        self._deadline, self._needed, self._timeout, self._what = time.monotonic() + timeout, needed, timeout, what
        try:
            yield
        finally:
            self._deadline = None

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes; raises NodeWaitTimeout when a bounded wait has run out."""
        nodes = list(self.grid.get_node_ids())
        if self._deadline is not None and len(nodes) < self._needed and time.monotonic() > self._deadline:
            raise NodeWaitTimeout(
                f"{self._what}: only {len(nodes)} node(s) connected, {self._needed} needed "
                f"(min_clients); waited {self._timeout:g} s (round_timeout). Start the missing client(s), "
                "or lower --min-clients"
            )
        return nodes
