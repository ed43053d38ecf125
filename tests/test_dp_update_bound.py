"""The bound on how far an honest DP-SGD client moves the model in a round: it holds for real Opacus
rounds, is tight enough to catch a doubled update, and the update screen rejects what exceeds it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.utils.data import TensorDataset

from fedweights.config import DPConfig, RunConfig
from fedweights.privacy.dp_sgd import RoundPlan, train_private_round
from fedweights.privacy.plan import batches_per_epoch, round_plan
from fedweights.privacy.protocol import PRIVACY, ClientSpend
from fedweights.strategies import ValidatedStrategy, build_strategy
from fedweights.strategies.dp_update_bound import DPUpdateBound, momentum_weights

from .flower_messages import NodesGrid, array_record, train_reply

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Secure RNG turned off")


def data(n: int, loud: bool = False) -> TensorDataset:
    generator = torch.Generator().manual_seed(n)
    inputs = torch.randn(n, 64, generator=generator) * (100 if loud else 1)
    return TensorDataset(inputs, torch.randint(0, 10, (n,), generator=generator))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def honest_norm(n, batch, epochs, sigma, lr, momentum, proximal_mu=0.0, loud=False) -> float:
    batches = batches_per_epoch(n, batch)
    plan = RoundPlan(sigma, 1.0 / batches, batches * epochs, 1.0, batch, epochs, n)
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_private_round(model, data(n, loud), plan, [], CPU, lr, momentum, "auto", proximal_mu)
    return math.sqrt(sum(float((result.state_dict[k] - v).pow(2).sum()) for k, v in before.items()))


SIZE = sum(p.numel() for p in mlp().parameters())


def bound_of(lr, momentum, clip, batch, epochs, sigma) -> DPUpdateBound:
    """The bound of a run with these DP-SGD settings (σ 0 stands for a σ passed to norm_bound)."""
    dp = DPConfig(enabled=True, noise_multiplier=sigma or 1.0, max_grad_norm=clip)
    return DPUpdateBound.of_run(RunConfig(lr=lr, momentum=momentum, batch_size=batch, local_epochs=epochs, dp=dp))


@pytest.mark.parametrize(
    ("n", "batch", "epochs", "sigma", "lr", "momentum", "mu", "loud", "least_share"),
    [
        (200, 8, 3, 5.0, 0.1, 0.9, 0.0, False, 0.6),  # noise dominates: the bound is near the update
        (100, 16, 2, 1.0, 0.1, 0.9, 0.0, False, 0.2),
        (64, 64, 5, 0.01, 1.0, 0.0, 0.0, True, 0.02),  # every gradient clipped, almost no noise
        (150, 10, 2, 1.0, 0.1, 0.9, 0.5, False, 0.1),  # FedProx's proximal step
    ],
)
def test_a_real_dp_sgd_round_stays_within_the_bound(n, batch, epochs, sigma, lr, momentum, mu, loud, least_share):
    bound = bound_of(lr, momentum, 1.0, batch, epochs, sigma).norm_bound(n, sigma, SIZE)
    for _ in range(3):
        norm = honest_norm(n, batch, epochs, sigma, lr, momentum, mu, loud)
        assert least_share * bound <= norm <= bound, (norm, bound)


def test_the_bound_grows_with_noise_steps_and_weights():
    bound = bound_of(0.1, 0.9, 1.0, 16, 1, 1.0)
    base = bound.norm_bound(360, 1.0, 27_000)
    assert bound.norm_bound(360, 2.0, 27_000) > 1.5 * base
    assert bound.norm_bound(720, 1.0, 27_000) > base
    assert bound.norm_bound(360, 1.0, 108_000) > 1.5 * base
    # no momentum: one step of lr·(signal + noise) per batch
    plain = bound_of(0.1, 0.0, 1.0, 16, 1, 0.0).norm_bound(16, 0.0, 100)
    assert plain == pytest.approx(0.1 * 1.0 * (16 + 6 * 4 + 6) / 16)


GLOBAL = {"w": np.zeros((4, 2), np.float32)}


def dp_reply(node: int, value: float, sigma: float = 1.0, n_examples: int = 10, spend: bool = True):
    reply = train_reply(node, {"w": np.full((4, 2), value, np.float32)}, num_examples=n_examples)
    if spend:
        record = ClientSpend(f"c{node}", sigma, 1.0, 1, [(sigma, 1.0, 1)], 1.0, 1e-5, "pld", 1.0, 16, 1, n_examples,
                             "ghost").to_record()
        reply.content[PRIVACY] = record
    return reply


def screened(bound: DPUpdateBound, *replies):
    strategy = ValidatedStrategy(FedAvg(min_available_nodes=1), dp_bound=bound)
    list(strategy.configure_train(1, array_record(GLOBAL), ConfigRecord(), NodesGrid([1, 2])))
    accepted, rejected = strategy.screen(list(replies), 1)
    return [r.metadata.src_node_id for r in accepted], {int(r["node"]): r["reason"] for r in rejected}


def test_an_update_no_dp_sgd_client_can_send_is_rejected_even_with_two_sites():
    bound = bound_of(0.1, 0.9, 1.0, 16, 1, 1.0)  # n=10, one step: at most ~0.44 here
    accepted, rejected = screened(bound, dp_reply(1, 0.1), dp_reply(2, 1e3))
    assert accepted == [1]
    assert "update norm 2828 is over 0.4" in rejected[2]
    assert "the furthest DP-SGD moves the model in one round" in rejected[2] and "σ 1," in rejected[2]
    assert "--no-dp-update-bound" in rejected[2]


def test_the_run_sigma_is_used_and_a_reply_without_a_spend_is_judged_by_its_example_count():
    bound = bound_of(0.1, 0.9, 1.0, 16, 1, 1.0)
    # a client claiming a huge σ does not widen the bound when the run fixes σ
    accepted, rejected = screened(bound, dp_reply(1, 1e3, sigma=1e9), dp_reply(2, 0.1, spend=False),
                                  dp_reply(3, 1e3, spend=False))
    assert accepted == [2] and set(rejected) == {1, 3}


def test_under_a_target_epsilon_a_client_is_judged_by_its_calibrated_sigma_and_an_overstated_one_is_refused():
    config = RunConfig(dp=DPConfig(enabled=True, target_epsilon=4.0), rounds=5)
    bound = DPUpdateBound.of_run(config)
    calibrated = round_plan(10, config).noise_multiplier  # what a client with 10 examples uses
    accepted, rejected = screened(bound, dp_reply(1, 0.1, sigma=calibrated), dp_reply(2, 1e3, sigma=calibrated),
                                  dp_reply(3, 0.1, sigma=50 * calibrated), dp_reply(4, 0.1, sigma=float("nan")))
    assert accepted == [1]
    assert "is over" in rejected[2]
    assert f"states σ {50 * calibrated:g}, which over the planned 5 rounds would spend" in rejected[3]
    assert "under 0.5x the target 4" in rejected[3]
    assert "noise multiplier of nan, not a positive finite number" in rejected[4]


def test_build_strategy_bounds_dp_runs_only_and_can_be_turned_off():
    dp = RunConfig(dp=DPConfig(enabled=True, noise_multiplier=2.0), batch_size=32, lr=0.05)
    assert build_strategy(dp).dp_bound == bound_of(0.05, 0.9, 1.0, 32, 1, 2.0)
    target = RunConfig(dp=DPConfig(enabled=True, target_epsilon=4.0))
    assert build_strategy(target).dp_bound.noise_multiplier is None
    assert build_strategy(RunConfig()).dp_bound is None
    off = RunConfig.from_flat({**dp.to_flat(), "strategy.dp_update_bound": False})
    assert build_strategy(off).dp_bound is None


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("steps", [1, 7, 300])
def test_momentum_weights_in_closed_form_match_the_sums(beta, steps):
    weights = [sum(beta**k for k in range(steps - t)) for t in range(steps)]
    largest, squares = momentum_weights(beta, steps)
    assert largest == pytest.approx(max(weights), rel=1e-9)
    assert squares == pytest.approx(sum(c * c for c in weights), rel=1e-7)


def test_a_reply_claiming_an_enormous_example_count_is_judged_at_once_by_the_smaller_count():
    bound = bound_of(0.1, 0.9, 1.0, 16, 1, 1.0)
    huge = dp_reply(2, 1e3, n_examples=10)
    huge.content[PRIVACY]["n_examples"] = 10**18  # a spend that would imply 6e16 steps
    accepted, rejected = screened(bound, dp_reply(1, 0.1), huge)
    assert accepted == [1] and "10 examples" in rejected[2]
    assert bound.norm_bound(10**18, 1.0, 10**6) < math.inf  # closed form: no loop over the steps


def test_an_absurd_sigma_or_example_count_under_a_target_is_judged_at_once():
    bound = DPUpdateBound.of_run(RunConfig(dp=DPConfig(enabled=True, target_epsilon=4.0), rounds=5))
    huge = dp_reply(2, 0.1, sigma=2.0, n_examples=10**15)  # q = 1.6e-14: below any accountable sample rate
    accepted, rejected = screened(bound, dp_reply(1, 0.1, sigma=1e9), huge)
    assert accepted == [] and "states σ 1e+09" in rejected[1] and "states σ 2," in rejected[2]
