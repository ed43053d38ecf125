"""A Task says what a federation trains: a model factory, training data and held-out test data.

Built-in tasks come from the run config (``dataset``, ``model``); users bring their own
``torch.nn.Module`` and ``torch.utils.data.Dataset`` by building a ``Task`` in Python, or by
naming a ``"package.module:function"`` that returns one in the config key ``task``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cloudpickle
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from .config import RunConfig
from .data import dirichlet_partition, iid_partition, labels_of, load_digits_split, load_fashion_mnist
from .errors import ConfigError, UserError
from .models import build_model, fit_problem


@dataclass
class ClientData:
    """One client's share: examples it trains on and examples it evaluates on."""

    train: Dataset
    test: Dataset


@dataclass
class Task:
    """A model factory plus training and held-out test data for a classification task.

    ``model_fn`` must build a fresh, identically shaped ``nn.Module`` on every call; its
    output is class logits and the loss is cross-entropy. Client ``i`` of ``n`` trains on
    partition ``i`` of ``train_data`` and evaluates on shard ``i`` of ``test_data``, so the
    example-weighted mean of client accuracies is the accuracy on the whole test set.
    """

    model_fn: Callable[[], nn.Module]
    train_data: Dataset
    test_data: Dataset
    name: str = "custom"

    def check(self) -> None:
        """Raise UserError unless ``model_fn`` builds a module, both datasets have examples, and the
        model takes them: a forward pass on a few examples, integer labels within its logits."""
        if isinstance(self.model_fn, nn.Module) or not callable(self.model_fn):
            raise UserError(
                f"Task.model_fn must be a function that builds a new model (e.g. model_fn=MyNet or "
                f"lambda: MyNet(64, 10)), got {type(self.model_fn).__name__}: a model instance would be shared by all clients"
            )
        model = self.model_fn()
        if not isinstance(model, nn.Module):
            raise UserError(f"Task.model_fn must return a torch.nn.Module, it returned {type(model).__name__}")
        for name in ("train_data", "test_data"):
            data = getattr(self, name)
            if not hasattr(data, "__getitem__") or not hasattr(data, "__len__") or len(data) == 0:
                raise UserError(f"Task.{name} must be a non-empty torch Dataset (e.g. a TensorDataset), got {type(data).__name__}")
            problem = fit_problem(self.model_fn(), *_sample_batch(data, name))
            if problem is not None:
                raise UserError(f"Task.{name} does not fit Task.model_fn's model: {problem}")

    def client_data(self, partition_id: int, num_partitions: int, config: RunConfig) -> ClientData:
        """The train partition and test shard of client ``partition_id`` out of ``num_partitions``.

        Partitions depend only on the data, ``num_partitions``, ``config.partition``,
        ``config.alpha`` and ``config.seed``, so every process computes the same split.
        """
        n = num_partitions
        if not 0 <= partition_id < n:
            raise UserError(f"partition {partition_id} is outside 0..{n - 1}")
        if config.partition == "dirichlet":
            parts = dirichlet_partition(labels_of(self.train_data), n, config.alpha, config.seed)
        else:
            parts = iid_partition(len(self.train_data), n, config.seed)
        test_shards = iid_partition(len(self.test_data), min(n, len(self.test_data)), config.seed + 1)
        test_idx = test_shards[partition_id] if partition_id < len(test_shards) else []
        return ClientData(Subset(self.train_data, parts[partition_id].tolist()), Subset(self.test_data, list(test_idx)))


def _sample_batch(data: Dataset, name: str, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``size`` examples of ``data`` as a batch, and the labels to check: all of them when
    they are at hand (a TensorDataset, a ``targets`` attribute), else the batch's."""
    items = [data[i] for i in range(min(size, len(data)))]
    if not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
        raise UserError(f"Task.{name} must yield (input, label) pairs, its first item is {type(items[0]).__name__}")
    try:
        inputs = torch.stack([torch.as_tensor(x) for x, _ in items])
        labels = torch.as_tensor([torch.as_tensor(y).item() for _, y in items])
        if isinstance(data, TensorDataset) or getattr(data, "targets", None) is not None:
            labels = torch.as_tensor(labels_of(data))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"Task.{name}: its examples cannot be batched as tensors ({exc})") from None
    return inputs, labels


def builtin_task(config: RunConfig) -> Task:
    """The task named by ``config.dataset`` and ``config.model`` (cached per process)."""
    return _builtin_task(config.dataset, config.model, config.seed)


@lru_cache(maxsize=4)
def _builtin_task(dataset: str, model_name: str, seed: int) -> Task:
    if dataset == "fashion-mnist":
        train, test = load_fashion_mnist()
    else:
        train, test = load_digits_split(seed=seed)
    in_features = train.tensors[0].shape[1]
    num_classes = int(train.tensors[1].max()) + 1
    return Task(lambda: build_model(model_name, in_features, num_classes), train, test, name=dataset)


def import_task(spec: str, config: RunConfig) -> Task:
    """Call a user's ``"package.module:function"``; it may take the RunConfig as its one argument."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("task", f"={spec!r} cannot be imported: {exc}") from None
    task = factory(config) if inspect.signature(factory).parameters else factory()
    if not isinstance(task, Task):
        raise ConfigError("task", f"={spec!r} returned {type(task).__name__}, not fedweights.Task")
    task.check()
    return task


def save_task(task: Task, path: Path) -> Path:
    """Pickle a user's Task (cloudpickle: lambdas and local classes are fine) for client processes."""
    path.write_bytes(cloudpickle.dumps(task))
    return path


@lru_cache(maxsize=4)
def _load_pickled_task(path: str) -> Task:
    return cloudpickle.loads(Path(path).read_bytes())


def resolve_task(config: RunConfig, pickled: str | None = None) -> Task:
    """The Task for this run: a pickled Python-API task, else ``config.task``, else the built-in one."""
    if pickled:
        task = _load_pickled_task(pickled)
    elif config.task:
        task = import_task(config.task, config)
    else:
        task = builtin_task(config)
    if config.dp.enabled:  # server and clients must build the same DP-trainable model
        from .privacy.dp_sgd import dp_compatible_task

        task = dp_compatible_task(task)
    return task
