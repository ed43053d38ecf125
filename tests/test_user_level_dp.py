"""User-level DP-FedAvg: PLD accounting of Poisson-sampled rounds, sampling, clipping and noise calibration."""

from __future__ import annotations

import random

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from flwr.app import ConfigRecord

from fedweights.config import RunConfig, UserDPConfig
from fedweights.errors import UserError
from fedweights.privacy.user_level import noise_for_epsilon, plan_run, user_level_epsilon
from fedweights.strategies import UserLevelDPFedAvg, ValidatedStrategy, build_strategy

from .flower_messages import NodesGrid, array_record, train_reply


def direct_pld(q: float, z: float, rounds: int, delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return accountant.get_epsilon(delta)


def test_issue_example_is_about_0_72_not_flowers_96():
    eps = user_level_epsilon(10 / 1000, 1.0, 100, 1e-5)
    assert eps == pytest.approx(0.72, abs=0.01)
    plan = plan_run(population=1000, clients_per_round=10, rounds=100, delta=1e-5, noise_multiplier=1.0)
    assert plan.epsilon == eps and plan.sample_rate == 0.01


@pytest.mark.parametrize(("q", "z", "rounds", "delta"), [(0.01, 1.0, 100, 1e-5), (0.1, 2.0, 50, 1e-6), (0.5, 1.5, 20, 1e-5)])
def test_matches_dp_accounting_pld_and_stays_below_rdp(q, z, rounds, delta):
    eps = user_level_epsilon(q, z, rounds, delta)
    truth = direct_pld(q, z, rounds, delta)
    assert truth <= eps <= truth * 1.01  # never below PLD, within 1%
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    assert eps < rdp.get_epsilon(delta)  # PLD is the tighter (and still valid) bound


def test_target_epsilon_gives_the_smallest_noise_that_meets_it():
    z = noise_for_epsilon(2.0, 0.5, 20, 1e-5)
    assert user_level_epsilon(0.5, z, 20, 1e-5) <= 2.0 < user_level_epsilon(0.5, z - 2e-3, 20, 1e-5)
    plan = plan_run(population=10, clients_per_round=5, rounds=20, delta=1e-5, target_epsilon=2.0)
    assert plan.noise_multiplier == z and plan.epsilon <= 2.0


def test_impossible_plans_are_user_errors():
    with pytest.raises(UserError, match="clients per round"):
        plan_run(population=10, clients_per_round=11, rounds=5, delta=1e-5)
    with pytest.raises(UserError, match="delta"):
        user_level_epsilon(0.1, 1.0, 5, 0.0)


GLOBAL = {"w": np.zeros((200, 500), dtype=np.float32), "steps": np.array([3], dtype=np.int64)}


def dp_strategy(z=1.0, s=2.0, q=1.0, m=4.0, seed=0) -> UserLevelDPFedAvg:
    strategy = UserLevelDPFedAvg(z, s, q, m, sampler=random.Random(seed), noise_rng=np.random.default_rng(seed),
                                 min_available_nodes=1)  # fmt: skip
    list(strategy.configure_train(1, array_record(GLOBAL), ConfigRecord(), NodesGrid(range(1, 5))))
    return strategy


def test_noise_on_the_average_has_std_z_s_over_m_even_with_no_client():
    arrays, metrics = dp_strategy(z=1.5, s=2.0, m=4.0).aggregate_train(1, [])
    noise = arrays["w"].numpy()
    assert noise.dtype == np.float32 and arrays["steps"].numpy().tolist() == [3]  # integer arrays untouched
    assert noise.std() == pytest.approx(1.5 * 2.0 / 4.0, rel=0.01)  # 100k draws: std error ~0.2%
    assert abs(noise.mean()) < 0.01 and len(metrics) == 0  # no unnoised training metrics leak


def test_each_update_is_clipped_to_s_and_weights_are_ignored():
    big = {"w": np.full((200, 500), 1.0, np.float32), "steps": np.array([9])}  # norm 316 → clipped to S=2
    small = {"w": np.full((200, 500), 0.001, np.float32), "steps": np.array([9])}  # norm 0.316 → kept
    noise_only = dp_strategy().aggregate_train(1, [])[0]["w"].numpy()
    replies = [train_reply(1, big, num_examples=1), train_reply(2, small, num_examples=1000)]
    arrays = dp_strategy().aggregate_train(1, replies)[0]  # same seed, so the same noise draw
    signal = arrays["w"].numpy().astype(np.float64) - noise_only
    expected = (2.0 / np.sqrt(100_000) + 0.001) / 4.0  # (clipped big + small) / m, no example weighting
    np.testing.assert_allclose(signal, expected, rtol=1e-3)


def test_poisson_sampling_includes_each_node_with_probability_q():
    strategy = UserLevelDPFedAvg(1.0, 1.0, 0.1, 100.0, sampler=random.Random(1), min_available_nodes=1)
    grid = NodesGrid(range(1000))
    sizes = []
    for server_round in range(1, 21):
        sent = list(strategy.configure_train(server_round, array_record(GLOBAL), ConfigRecord(), grid))
        assert all(m.content["config"]["server-round"] == server_round for m in sent)
        sizes.append(len({m.metadata.dst_node_id for m in sent}))
    assert abs(np.mean(sizes) - 100) < 3 * np.sqrt(1000 * 0.1 * 0.9 / 20)  # mean of 20 Binomial(1000, 0.1)
    assert len(set(sizes)) > 1  # the sample size varies: Poisson, not a fixed m


def test_run_config_builds_validated_dp_fedavg_with_derived_noise():
    config = RunConfig(clients=10, rounds=20, user_dp=UserDPConfig(enabled=True, clients_per_round=5, target_epsilon=2.0))
    wrapper = build_strategy(config)
    assert isinstance(wrapper, ValidatedStrategy) and isinstance(wrapper.strategy, UserLevelDPFedAvg)
    dp = wrapper.strategy
    assert (dp.sample_rate, dp.expected_clients) == (0.5, 5.0)
    assert user_level_epsilon(0.5, dp.noise_multiplier, 20, 1e-5) <= 2.0
