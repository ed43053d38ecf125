"""Tasks: built-in, imported from 'module:function', and pickled for client processes."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedweights.config import RunConfig
from fedweights.errors import ConfigError, UserError
from fedweights.task import Task, builtin_task, resolve_task, save_task


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_fed_task.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "import fedweights\n"
        "def make(config):\n"
        "    x = torch.rand(40, 3); y = (x.sum(1) > 1.5).long()\n"
        "    ds = TensorDataset(x, y)\n"
        "    return fedweights.Task(lambda: torch.nn.Linear(3, 2), ds, ds, name=f'toy-{config.seed}')\n"
        "def not_a_task():\n"
        "    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_fed_task"
    sys.modules.pop("my_fed_task", None)


def test_config_can_name_a_user_task(user_module):
    task = resolve_task(RunConfig(task=f"{user_module}:make", seed=3))
    assert task.name == "toy-3" and len(task.train_data) == 40
    data = task.client_data(1, 4, RunConfig(clients=4))
    assert len(data.train) == 10


def test_bad_task_specs_are_config_errors(user_module):
    with pytest.raises(ConfigError, match="cannot be imported"):
        resolve_task(RunConfig(task="no_such_module_xyz:make"))
    with pytest.raises(ConfigError, match="cannot be imported"):
        resolve_task(RunConfig(task=f"{user_module}:missing"))
    with pytest.raises(ConfigError, match="not fedweights.Task"):
        resolve_task(RunConfig(task=f"{user_module}:not_a_task"))


def test_pickled_task_round_trips_lambdas(tmp_path):
    task = builtin_task(RunConfig())
    path = save_task(Task(lambda: task.model_fn(), task.train_data, task.test_data, "copy"), tmp_path / "t.pkl")
    loaded = resolve_task(RunConfig(), str(path))
    assert loaded.name == "copy" and len(loaded.train_data) == len(task.train_data)
    assert set(loaded.model_fn().state_dict()) == set(task.model_fn().state_dict())


def _digits_task(model_fn, labels_dtype=None, split: str = "train"):
    task = builtin_task(RunConfig())
    x, y = task.train_data.tensors
    train = TensorDataset(x, y if labels_dtype is None else y.to(labels_dtype))
    return Task(model_fn, train, task.test_data) if split == "train" else Task(model_fn, task.test_data, train)


class Pairs(Dataset):
    """A map-style dataset without tensors at hand: only the examples checked are read."""

    def __init__(self, label: int) -> None:
        self.label = label

    def __len__(self) -> int:
        return 100

    def __getitem__(self, i):
        return torch.zeros(64), self.label


@pytest.mark.parametrize(("task", "message"), [
    (_digits_task(lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))),
     "Task.train_data does not fit Task.model_fn's model: labels run 0..9, but the model outputs 5 class logits"),
    (_digits_task(lambda: nn.Linear(60, 10)),
     "Task.train_data does not fit Task.model_fn's model: examples of shape (64,) do not fit the model (RuntimeError: mat1"),
    (_digits_task(lambda: nn.Linear(64, 10), labels_dtype=torch.float32), "labels are torch.float32; cross-entropy needs integer"),
    (_digits_task(lambda: nn.Linear(64, 10), labels_dtype=torch.float32, split="test"), "Task.test_data does not fit"),
    (Task(lambda: nn.Linear(64, 10), Pairs(3), Pairs(12)), "Task.test_data does not fit Task.model_fn's model: labels run 12..12"),
    (Task(lambda: nn.Flatten(0), Pairs(3), Pairs(3)), "logits of shape (batch, classes), it output (512,)"),
])
def test_a_task_whose_model_does_not_take_its_data_is_refused_before_training(task, message):
    with pytest.raises(UserError) as err:
        task.check()
    assert message in str(err.value)
    _digits_task(lambda: nn.Linear(64, 10)).check()  # and a task that fits passes
    Task(lambda: nn.Linear(64, 4), Pairs(3), Pairs(0)).check()
