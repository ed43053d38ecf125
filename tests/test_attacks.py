"""Simulated attacks transform exactly the malicious clients' updates or labels; FedProx's client term."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.utils.data import TensorDataset

from flwr.app import ConfigRecord, Context, RecordDict
from flwr.serverapp.strategy import FedProx

from fedweights.attacks import poison_labels, tamper_update
from fedweights.config import AttackConfig, RunConfig
from fedweights.flower.client_app import train_reply
from fedweights.flower.runtime import Runtime
from fedweights.proximal import ProximalLoss, local_criterion

from .flower_messages import NodesGrid

START = {"w": torch.zeros(50, 40), "steps": torch.tensor([7])}
TRAINED = {"w": torch.full((50, 40), 0.5), "steps": torch.tensor([8])}


def attacked(kind: str, partition_id: int = 0, scale: float = 10.0) -> dict[str, torch.Tensor]:
    attack = AttackConfig(malicious=2, kind=kind, scale=scale)
    return tamper_update(attack, partition_id, ArrayRecord(START), dict(TRAINED), seed=3)


def test_update_attacks_transform_the_update_of_malicious_clients_only():
    assert torch.equal(attacked("sign-flip")["w"], torch.full((50, 40), -5.0))  # start - 10 · update
    assert torch.equal(attacked("scale", scale=3.0)["w"], torch.full((50, 40), 1.5))  # start + 3 · update
    noise = attacked("gaussian", scale=2.0)["w"]
    assert noise.std().item() == pytest.approx(2.0, rel=0.1) and abs(noise.mean().item()) < 0.2
    assert torch.equal(attacked("gaussian", scale=2.0)["w"], noise)  # seeded: reproducible runs
    assert attacked("sign-flip")["steps"].item() == 8  # integer buffers are left alone
    assert attacked("sign-flip", partition_id=2) == TRAINED  # partitions 0..malicious-1 attack, others are honest
    assert attacked("label-flip") == TRAINED  # a data attack does not touch the update


def test_label_flip_poisons_the_malicious_clients_labels():
    train = TensorDataset(torch.zeros(6, 2), torch.tensor([0, 1, 2, 3, 4, 9]))
    part = torch.utils.data.Subset(train, [0, 1, 5])
    flipped = poison_labels(AttackConfig(malicious=1, kind="label-flip"), 0, part, train)
    assert [int(flipped[i][1]) for i in range(3)] == [9, 8, 0]  # y → 10 - 1 - y
    assert poison_labels(AttackConfig(malicious=1, kind="label-flip"), 1, part, train) is part
    assert poison_labels(AttackConfig(malicious=1, kind="sign-flip"), 0, part, train) is part


def test_proximal_term_pulls_towards_the_global_model():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    loss = local_criterion(model, 0.5)
    assert isinstance(loss, ProximalLoss) and local_criterion(model, 0.0) is None
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    assert loss(model(x), y).item() == pytest.approx(nn.CrossEntropyLoss()(model(x), y).item())  # no drift yet
    with torch.no_grad():
        model.weight += 1.0  # drift of 1 on each of 6 weights
    expected = nn.CrossEntropyLoss()(model(x), y) + 0.5 * 0.5 * 6
    assert loss(model(x), y).item() == pytest.approx(expected.item(), rel=1e-6)
    model.zero_grad()
    (loss(model(x), y) - nn.CrossEntropyLoss()(model(x), y)).backward()
    torch.testing.assert_close(model.weight.grad, torch.full((2, 3), 0.5))  # mu · (w - w_global)


def client_update(config: RunConfig, mu: float = 0.0) -> tuple[dict, dict]:
    """(global state, state the ClientApp's train step replies with) for partition 0 of 4."""
    runtime = Runtime(config)
    torch.manual_seed(0)  # the same global model every call
    model = runtime.task().model_fn()
    context = Context(1, 1, {"partition-id": 0, "num-partitions": 4}, RecordDict(), {})
    strategy = FedProx(proximal_mu=mu, min_available_nodes=1, min_train_nodes=1, fraction_train=0.01)
    (msg,) = strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), NodesGrid([1]))
    return model.state_dict(), train_reply(msg, context, runtime).content["arrays"].to_torch_state_dict()


def distance(a: dict, b: dict) -> float:
    return sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5


def test_fedprox_mu_from_the_server_keeps_client_weights_closer_to_the_global_model():
    """The ClientApp's train step reads Flower FedProx's ``proximal-mu`` from the train config."""
    config = RunConfig(clients=4, lr=0.2)
    assert distance(*client_update(config, mu=5.0)) < 0.5 * distance(*client_update(config, mu=0.0))


def test_client_app_applies_the_attack_of_a_malicious_partition():
    start, honest = client_update(RunConfig(clients=4))
    _, flipped = client_update(RunConfig(clients=4, attack=AttackConfig(malicious=1, kind="sign-flip", scale=1.0)))
    for key in start:  # same seed, same training: the attacker reports the reversed update
        torch.testing.assert_close(flipped[key] - start[key], -(honest[key] - start[key]))
    _, poisoned = client_update(RunConfig(clients=4, attack=AttackConfig(malicious=1, kind="label-flip")))
    assert distance(poisoned, honest) > 0.1 * distance(honest, start)  # trained on other labels
