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
def test_clipping_bounds_the_update_in_every_mode(model_fn):
    """One step over all 64 examples (q = 1), lr 1, almost no noise: the update is the mean of
    clipped per-example gradients, so its norm is at most C, while the unclipped one is far larger."""
    data, clip = loud_data(), 0.5
    plan = RoundPlan(noise_multiplier=1e-6, sample_rate=1.0, steps=1, max_grad_norm=clip, batch_size=64, local_epochs=1,
                     n_examples=64)
    modes = {"mlp": "fused", "cnn": "hooks"}
    assert choose_grad_sample_mode(model_fn()) == modes[model_fn.__name__]
    for mode in ("fused", "ghost", "hooks") if model_fn is mlp else ("ghost", "hooks"):
        result = train_private_round(model_fn(), data, plan, [], CPU, lr=1.0, momentum=0.0, grad_sample_mode=mode)
        assert result.grad_sample_mode == mode
        assert not any(k.startswith("_module.") for k in result.state_dict)
        assert update_norm(model_fn(), result.state_dict) <= clip * 1.001
        assert result.history == [(1e-6, 1.0, 1)]

    plain = model_fn()  # the same step without DP: the bound above is not trivially true
    nn.CrossEntropyLoss()(plain(data.tensors[0]), data.tensors[1]).backward()
    assert math.sqrt(sum(float(p.grad.pow(2).sum()) for p in plain.parameters())) > 20 * clip


@pytest.mark.parametrize("mode", ["fused", "ghost", "hooks"])
def test_batch_size_one_trains_finite_weights_for_every_shard_size(mode):
    """49 examples at batch 1: q = 1/49 and 49·(1/49) = 0.999… in floats, so Opacus' divisor
    int(n·q) was 0 and every mode trained the model to inf."""
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(49, 64, generator=generator), torch.randint(0, 10, (49,), generator=generator))
    plan = RoundPlan(1.0, 1 / 49, 49, 1.0, 1, 1, 49)
    assert plan.expected_batch_size == 1
    result = train_private_round(mlp(), data, plan, [], CPU, lr=0.1, momentum=0.0, grad_sample_mode=mode)
    assert all(torch.isfinite(v).all() for v in result.state_dict.values())


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


def test_a_target_epsilon_is_a_budget_a_retried_or_extra_round_cannot_exceed():
    """The noise is calibrated so the planned rounds spend at most the target; a round trained
    again (a retried attempt, a resumed run given more rounds) must not take the client past it."""
    data = loud_data(64)  # q = 1/4, 4 steps a round
    config = RunConfig(clients=4, rounds=2, batch_size=16, dp=DPConfig(enabled=True, target_epsilon=3.0))
    planned = node_context({})
    for server_round in (1, 2):
        outcome = client_round(config, planned, server_round, data)
        assert isinstance(outcome, PrivateOutcome)  # the planned run fits its target
    spend = ClientSpend.from_record(outcome.records[PRIVACY])
    assert 2.9 < spend.epsilon <= 3.0 and spend.budget == 3.0

    retried = node_context({})
    assert isinstance(client_round(config, retried, 1, data), PrivateOutcome)
    assert isinstance(client_round(config, retried, 1, data), PrivateOutcome)  # round 1, attempt 2
    reply = client_round(config, retried, 2, data)
    assert isinstance(reply, Message) and reply.error.code == BUDGET_EXHAUSTED
    assert "> target_epsilon=3." in reply.error.reason


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


def test_a_dp_client_sends_no_unnoised_training_loss(tmp_path, serverapp_process):
    """The mean training loss is computed on the raw training records without noise: a DP client
    that sent it would release what its ε does not cover. Only the noised update (and the example
    count, its aggregation weight) leaves the node."""
    from fedweights.config import DPConfig, RunConfig
    from fedweights.flower.round_loop import run_federation
    from fedweights.flower.runtime import Runtime
    from fedweights.progress import RichReporter

    from .local_grid import LocalGrid, node_configs

    class RecordingGrid(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):  # noqa: D102 - Grid API
            replies = super().send_and_receive(messages, timeout=timeout)
            self.train_metrics = getattr(self, "train_metrics", []) + [
                dict(r.content["metrics"]) for r in replies if r.metadata.message_type == "train" and not r.has_error()
            ]
            return replies

    config = RunConfig(clients=2, rounds=1, out=str(tmp_path / "run"), dp=DPConfig(enabled=True, noise_multiplier=1.0))
    grid = RecordingGrid(Runtime(config), node_configs(2))
    run_federation(grid, Runtime(config), reporter=RichReporter())
    assert len(grid.train_metrics) == 2
    assert all(set(metrics) == {"num-examples"} for metrics in grid.train_metrics), grid.train_metrics
    (record,) = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert record["num_clients"] == 2 and record["train_loss"] is None


@pytest.mark.parametrize("n", [93, 99, 20])
def test_history_records_the_rate_opacus_samples_at(n):
    """Opacus samples at q = 1/ceil(n/b) but its Poisson loader then has int(1/q) batches, one fewer
    for some n (93, 99, ...), and its accountant hook records q = 1/len(loader) (1/92 for n=93). The
    history must carry the rate actually sampled, the plan's: with another q the coordinator's ledger
    (which adds this round's (σ, q, steps) to what it knew) counted the round twice."""
    from fedweights.privacy.plan import round_plan

    config = RunConfig(batch_size=1, dp=DPConfig(enabled=True, noise_multiplier=1.0))
    plan = round_plan(n, config)
    data = TensorDataset(torch.randn(n, 4), torch.randint(0, 2, (n,)))
    prior = [(1.0, plan.sample_rate, 5)]
    result = train_private_round(nn.Linear(4, 2), data, plan, prior, torch.device("cpu"), 0.1, 0.0, "ghost")
    ((sigma, rate, steps),) = result.history
    assert (sigma, rate) == (1.0, plan.sample_rate)
    assert steps - 5 in (plan.steps, plan.steps - 1)  # the batches Opacus' sampler actually drew


def test_flower_log_lines_print_once_after_opacus_is_imported():
    # Opacus' import calls logging.basicConfig; its extra root handler doubled every Flower line.
    script = (
        "import logging, fedweights.privacy.dp_sgd\n"
        "from flwr.common.logger import log\n"
        "log(logging.WARNING, 'round 3: a line said once')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (out.stdout + out.stderr).count("round 3: a line said once") == 1
