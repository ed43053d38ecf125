"""Models, device selection, and the local train/eval loops."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from fedweights.config import RunConfig
from fedweights.errors import UserError
from fedweights.models import build_model
from fedweights.task import builtin_task
from fedweights.training import evaluate, make_optimizer, select_device, train_epochs


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
