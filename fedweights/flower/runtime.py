"""What a fedweights ServerApp/ClientApp needs to know about its run, wherever it runs.

Under ``fedweights simulate`` the apps are built with a fixed ``Runtime``; under stock
``flwr run`` (or ``fedweights server``) they rebuild it from Flower's ``context.run_config``.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Context

from ..config import RunConfig
from ..task import Task, resolve_task

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"


@dataclass(frozen=True)
class Runtime:
    """The run config plus where a Python-API task was pickled (if the run has one)."""

    config: RunConfig
    task_file: str | None = None

    def task(self) -> Task:
        """The run's Task (built-in, imported, or unpickled), cached per process."""
        return resolve_task(self.config, self.task_file)


def runtime_from_context(context: Context) -> Runtime:
    """Rebuild the Runtime from Flower's run config (the ``flwr run`` path)."""
    return Runtime(RunConfig.from_flat(context.run_config))


def fixed_runtime(runtime: Runtime):
    """A ``context -> Runtime`` function that ignores the context (the simulate path)."""

    def _runtime(_context: Context) -> Runtime:
        return runtime

    return _runtime


def node_partition(context: Context, config: RunConfig) -> tuple[int, int]:
    """(partition id, number of partitions) of this node, from its node config."""
    pid = int(context.node_config.get(PARTITION_ID, 0))
    num = int(context.node_config.get(NUM_PARTITIONS, config.clients))
    return pid, num
