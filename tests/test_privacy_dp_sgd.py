"""DP-SGD on a client: clipping in force, BatchNorm fixed, the accountant carried across rounds,
processes and restarts, and the budget checked before training."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import warnings

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message import make_message
from flwr.app.metadata import Metadata
from torch import nn
from torch.utils.data import TensorDataset

from fedweights.config import DPConfig, RunConfig
from fedweights.flower.runtime import NODE_STATE_DIR, PARTITION_ID, Runtime
from fedweights.privacy.accounting import epsilon
from fedweights.privacy.client import PrivateOutcome, train_privately
from fedweights.privacy.dp_sgd import (
    DPModelFixWarning,
    RoundPlan,
    choose_grad_sample_mode,
    make_dp_compatible,
    train_private_round,
)
from fedweights.privacy.protocol import BUDGET_EXHAUSTED, PRIVACY, ClientSpend

from .conftest import REPO

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Secure RNG turned off")


def loud_data(n: int = 64) -> TensorDataset:
    """Inputs scaled up so every per-example gradient is far larger than the clipping norm."""
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(100 * torch.randn(n, 64, generator=generator), torch.randint(0, 10, (n,), generator=generator))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def update_norm(before: nn.Module, after: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((after[k] - v).pow(2).sum()) for k, v in before.state_dict().items()))


@pytest.mark.parametrize("model_fn", [mlp, cnn], ids=["mlp", "cnn"])
def test_clipping_bounds_the_update_in_ghost_and_hooks_mode(model_fn):
    """One step over all 64 examples (q = 1), lr 1, almost no noise: the update is the mean of
    clipped per-example gradients, so its norm is at most C, while the unclipped one is far larger."""
    data, clip = loud_data(), 0.5
    plan = RoundPlan(noise_multiplier=1e-6, sample_rate=1.0, steps=1, max_grad_norm=clip, batch_size=64, local_epochs=1,
                     n_examples=64)
    modes = {"mlp": "ghost", "cnn": "hooks"}
    assert choose_grad_sample_mode(model_fn()) == modes[model_fn.__name__]
    for mode in ("ghost", "hooks"):
        result = train_private_round(model_fn(), data, plan, [], CPU, lr=1.0, momentum=0.0, grad_sample_mode=mode)
        assert result.grad_sample_mode == mode
        assert not any(k.startswith("_module.") for k in result.state_dict)
        assert update_norm(model_fn(), result.state_dict) <= clip * 1.001
        assert result.history == [(1e-6, 1.0, 1)]

    plain = model_fn()  # the same step without DP: the bound above is not trivially true
    nn.CrossEntropyLoss()(plain(data.tensors[0]), data.tensors[1]).backward()
    assert math.sqrt(sum(float(p.grad.pow(2).sum()) for p in plain.parameters())) > 20 * clip


def test_fedprox_proximal_step_runs_after_each_dp_step():
    """lr·mu = 1 pulls the weights all the way back to the global model after every step."""
    plan = RoundPlan(1.0, 0.25, 4, 1.0, 16, 1, 64)
    result = train_private_round(mlp(), loud_data(), plan, [], CPU, lr=1.0, momentum=0.0, proximal_mu=1.0)
    assert update_norm(mlp(), result.state_dict) < 1e-5
    assert update_norm(mlp(), train_private_round(mlp(), loud_data(), plan, [], CPU, lr=1.0, momentum=0.0).state_dict) > 0.1


def test_batchnorm_model_is_fixed_with_a_visible_warning_and_trains():
    model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.warns(DPModelFixWarning, match="BatchNorm"):
        fixed = make_dp_compatible(model)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fixed.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an already-compatible model passes silently
        assert make_dp_compatible(fixed) is fixed
    plan = RoundPlan(1.0, 0.25, 4, 1.0, 16, 1, 64)
    result = train_private_round(fixed, loud_data(), plan, [], CPU, lr=0.1, momentum=0.9)
    assert set(result.state_dict) == set(fixed.state_dict())


# ---------------------------------------------------------------- the client's accountant and budget

def dp_config(**dp) -> RunConfig:
    return RunConfig(clients=4, rounds=5, batch_size=16, dp=DPConfig(enabled=True, noise_multiplier=1.0, **dp))


def train_message(server_round: int) -> Message:
    """A train message as the coordinator sends it (run 42, to node 7)."""
    content = RecordDict({"arrays": ArrayRecord(mlp().state_dict()), "config": ConfigRecord({"server-round": server_round})})
    metadata = Metadata(run_id=42, message_id=f"m{server_round}", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                        group_id=str(server_round), created_at=time.time(), ttl=3600, message_type="train")
    return make_message(metadata, content=content)


def client_round(config: RunConfig, context: Context, server_round: int, data: TensorDataset) -> PrivateOutcome | Message:
    return train_privately(train_message(server_round), context, Runtime(config), mlp(), data, CPU)


def node_context(node_config: dict) -> Context:
    return Context(run_id=42, node_id=7, node_config={PARTITION_ID: 3, **node_config}, state=RecordDict(), run_config={})


def test_accountant_survives_rounds_in_context_state_and_restarts_in_a_state_dir(tmp_path):
    data, config = loud_data(64), dp_config()  # 64 examples, batch 16: q = 1/4, 4 steps a round
    context = node_context({})  # simulation: Flower keeps context.state per node across rounds
    for server_round in (1, 2):
        outcome = client_round(config, context, server_round, data)
    spend = ClientSpend.from_record(outcome.records[PRIVACY])
    assert spend.client_id == "3" and spend.steps == 4 and spend.history == [(1.0, 0.25, 8)]
    assert spend.epsilon == epsilon([(1.0, 0.25, 8)], 1e-5)

    # deployment: the state file outlives the process; round 2 runs in a fresh Python process
    state_dir = tmp_path / "node-state"
    client_round(config, node_context({NODE_STATE_DIR: str(state_dir)}), 1, data)
    (state_file,) = state_dir.glob("dp-accountant-run-42.json")
    script = (
        "import sys; sys.path.insert(0, 'tests');"
        "from tests.test_privacy_dp_sgd import client_round, dp_config, loud_data, node_context;"
        "from fedweights.privacy.protocol import PRIVACY, ClientSpend;"
        f"outcome = client_round(dp_config(), node_context({{'state-dir': {str(state_dir)!r}}}), 2, loud_data(64));"
        "print(ClientSpend.from_record(outcome.records[PRIVACY]).history)"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[(1.0, 0.25, 8)]"
    assert json.loads(state_file.read_text())["history"] == [[1.0, 0.25, 8]]


def test_client_refuses_a_round_that_would_exceed_its_budget():
    data = loud_data(64)
    one_round = epsilon([(1.0, 0.25, 4)], 1e-5)
    two_rounds = epsilon([(1.0, 0.25, 8)], 1e-5)
    config = dp_config(max_epsilon=(one_round + two_rounds) / 2)
    context = node_context({})
    assert isinstance(client_round(config, context, 1, data), PrivateOutcome)
    state_before = context.state["fedweights.dp-accountant"]["json"]
    reply = client_round(config, context, 2, data)
    assert isinstance(reply, Message) and reply.has_error() and reply.error.code == BUDGET_EXHAUSTED
    assert reply.error.reason.startswith("privacy budget exhausted: client 3 has spent epsilon=")
    assert context.state["fedweights.dp-accountant"]["json"] == state_before  # it did not train


def test_noise_is_not_predictable_from_the_global_seed():
    plan = RoundPlan(1.0, 0.25, 4, 1.0, 16, 1, 64)
    torch.manual_seed(0)
    next_draw = torch.rand(1)
    results = []
    for _ in range(2):
        model = mlp()
        torch.manual_seed(0)  # e.g. the run seed, set by the coordinator or user code
        results.append(train_private_round(model, loud_data(), plan, [], CPU, lr=0.1, momentum=0.0).state_dict)
        assert torch.equal(torch.rand(1), next_draw)  # the global RNG is left as it was
    assert not torch.equal(results[0]["0.weight"], results[1]["0.weight"])
