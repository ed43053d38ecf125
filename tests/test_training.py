"""Models, device selection, and the local train/eval loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from fedweights.config import RunConfig
from fedweights.errors import UserError
from fedweights.models import build_model
from fedweights.task import builtin_task
from fedweights.training import evaluate, make_optimizer, select_device, train_epochs, train_loader


def test_auto_device_follows_cuda_availability():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    assert select_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(UserError, match="no CUDA GPU"):
        select_device("cuda")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_models_output_logits(name):
    model = build_model(name, 64, 10)
    assert model(torch.rand(5, 64)).shape == (5, 10)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_local_training_reduces_loss(name):
    config = RunConfig(model=name)
    task = builtin_task(config)
    data = task.client_data(0, 2, config)
    torch.manual_seed(0)
    model = task.model_fn()
    device = select_device("auto")
    loader = DataLoader(data.train, batch_size=16, shuffle=True)
    before = evaluate(model, loader, device)[0]
    train_epochs(model, loader, make_optimizer(model, 0.1, 0.9), epochs=3, device=device)
    after_loss, after_acc, count = evaluate(model, loader, device)
    assert count == len(data.train)
    assert after_loss < before * 0.5
    assert after_acc > 0.8


def bn_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def examples(n: int) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(n)
    return torch.utils.data.TensorDataset(torch.randn(n, 4, generator=generator), torch.randint(0, 2, (n,), generator=generator))


def batch_sizes(loader) -> list[int]:
    return [len(targets) for _, targets in loader]


def test_a_batchnorm_model_trains_on_a_shard_whose_last_batch_holds_one_example():
    """33 examples in batches of 16: the last batch of 1 made BatchNorm raise, and the client failed every round."""
    model, data = bn_model(), examples(33)
    loader = train_loader(data, 16, model, torch.Generator().manual_seed(0))
    assert batch_sizes(loader) == [16, 16]  # a different example left out each epoch (shuffled)
    loss = train_epochs(model, loader, make_optimizer(model, 0.1, 0.9), 2, torch.device("cpu"))
    assert math.isfinite(loss) and loss > 0  # it trained on the 32 examples
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):  # what the plain loader did
        train_epochs(model, DataLoader(data, batch_size=16), make_optimizer(model, 0.1, 0.9), 1, torch.device("cpu"))


@pytest.mark.parametrize(
    ("model", "n", "expected"),
    [
        (torch.nn.Linear(4, 2), 33, [16, 16, 1]),  # no BatchNorm: every example is used
        (None, 34, [16, 16, 2]),  # BatchNorm, a last batch of 2: kept
        (None, 16, [16]),
        (None, 1, [1]),  # one example in all: nothing to keep instead (BatchNorm cannot train on it)
    ],
)
def test_train_loader_drops_only_a_lone_last_example_and_only_for_batchnorm(model, n, expected):
    loader = train_loader(examples(n), 16, model or bn_model(), torch.Generator().manual_seed(0))
    assert batch_sizes(loader) == expected
