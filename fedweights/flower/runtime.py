"""What a fedweights ServerApp/ClientApp needs to know about its run, wherever it runs.

Under ``fedweights simulate`` the apps are built with a fixed ``Runtime``; under stock
``flwr run`` (or ``fedweights server``) they rebuild it from Flower's ``context.run_config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import Context

from ..config import RunConfig

if TYPE_CHECKING:  # the task module imports torch: `fedweights client` reads these keys without it
    from ..task import Task

RUN_ID_KEY = "fedweights-run-id"  # in every train message's config: the run id, the same after --resume

# Node-config keys (`flower-supernode --node-config "k=v ..."`; set by `fedweights client`).
PARTITION_ID = "partition-id"  # which partition of the built-in/task data this node trains on
NUM_PARTITIONS = "num-partitions"
NODE_DATA = "data"  # path to the node's own data, when it brings its own
NODE_NAME = "name"  # the node's stable name (its key's file name): its client id when it has no partition id
NODE_STATE_DIR = "state-dir"  # where the node keeps state that must survive restarts (accountant, keys)
NODE_HE_KEY = "he-key"  # path to the node's secret HE context
NODE_DEVICE = "device"  # auto | cpu | cuda, overriding the run config on this node


@dataclass(frozen=True)
class Runtime:
    """The run config plus where a Python-API task was pickled (if the run has one)."""

    config: RunConfig
    task_file: str | None = None

    def task(self) -> Task:
        """The run's Task (built-in, imported, or unpickled), cached per process."""
        from ..task import resolve_task

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
