"""Tasks: built-in, imported from 'module:function', and pickled for client processes."""

from __future__ import annotations

import sys

import pytest

from fedweights.config import RunConfig
from fedweights.errors import ConfigError
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
