"""User-level DP-FedAvg: PLD accounting of Poisson-sampled rounds, sampling, clipping and noise calibration."""

from __future__ import annotations

import json
import random

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from flwr.app import ConfigRecord

from fedweights.config import HEConfig, RunConfig, UserDPConfig
from fedweights.errors import UserError
from fedweights.flower.strategy_state import StrategyState
from fedweights.privacy.accounting import epsilon
from fedweights.privacy.user_level_report import UserLevelPrivacyFile
from fedweights.privacy.user_level import noise_for_epsilon, plan_run, user_level_epsilon
from fedweights.run_dir import RunDir
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


def test_a_resumed_run_never_repeats_the_noise_and_checkpoints_cannot_predict_it():
    """A round run again after a restart (its first model may have been released) must draw fresh
    noise: the same draw twice would let anyone subtract the two models and see the clipped sum bare.
    So the noise generator is neither written into the checkpoint nor restored from it."""
    user_dp = UserDPConfig(enabled=True, clients_per_round=5, noise_multiplier=1.0)
    config = RunConfig(clients=10, rounds=5, user_dp=user_dp)
    grid, start = NodesGrid(range(10)), array_record({"w": np.zeros(1000, np.float32)})
    running = build_strategy(config)
    state = StrategyState(running)
    list(running.configure_train(1, start, ConfigRecord(), grid))
    running.aggregate_train(1, [])  # round 1, then its checkpoint
    tree, blobs, uncaptured = state.capture()
    assert not uncaptured and "noise_rng" not in json.dumps(tree) and "$rng" not in json.dumps(tree)
    list(running.configure_train(2, start, ConfigRecord(), grid))
    first = running.aggregate_train(2, [])[0]["w"].numpy()  # round 2 released, then the coordinator stops
    resumed = build_strategy(config)
    StrategyState(resumed).restore(tree, blobs)
    list(resumed.configure_train(2, start, ConfigRecord(), grid))
    again = resumed.aggregate_train(2, [])[0]["w"].numpy()  # round 2 run again
    assert np.corrcoef(first, again)[0, 1] < 0.2  # independent draws (identical ones correlate 1.0)
    known = np.random.default_rng(7).bit_generator.state  # a checkpoint from before: it still holds the state
    inner = known["state"]
    old_entry = {"$rng": "Generator", "state": {"$dict": [
        ["bit_generator", "PCG64"], ["state", {"$dict": [["state", inner["state"]], ["inc", inner["inc"]]]}],
        ["has_uint32", 0], ["uinteger", 0]]}}  # fmt: skip
    old_tree = {**tree, "strategy.strategy": {"attributes": {"noise_rng": old_entry}}}
    restored = build_strategy(config)
    StrategyState(restored).restore(old_tree, blobs)
    assert not np.array_equal(restored.strategy.noise_rng.normal(size=5), np.random.default_rng(7).normal(size=5))


def test_one_bad_client_neither_takes_the_round_down_nor_escapes_clipping():
    """Used on its own (without ValidatedStrategy), DP-FedAvg screens each reply by itself: a NaN or
    malformed update counts as no update, a huge one is clipped to S, the good ones are still summed."""
    good = {"w": np.full((200, 500), 0.001, np.float32), "steps": np.array([9])}  # norm 0.316 ≤ S
    nan = {"w": np.full((200, 500), np.nan, np.float32), "steps": np.array([9])}
    huge = {"w": np.full((200, 500), 3e38, np.float32), "steps": np.array([9])}  # clipped to S = 2
    missing = {"steps": np.array([9])}
    replies = [train_reply(1, good), train_reply(2, nan), train_reply(3, missing, other=1.0),
               train_reply(4, huge)]
    noise_only = dp_strategy().aggregate_train(1, [])[0]["w"].numpy()
    arrays = dp_strategy().aggregate_train(1, replies)[0]  # same seed, same noise
    signal = arrays["w"].numpy().astype(np.float64) - noise_only
    assert np.isfinite(arrays["w"].numpy()).all()
    np.testing.assert_allclose(signal, (0.001 + 2.0 / np.sqrt(100_000)) / 4.0, rtol=1e-3)  # good + clipped huge, / m


def test_clipping_holds_for_finite_values_whose_squares_overflow():
    from fedweights.privacy.distributed import clip_l2

    clipped = clip_l2({"a": np.full(4, 1e200), "b": np.array([-1e200])}, 1.0)
    norm = np.sqrt(sum(float(np.sum(np.square(v / 1e-3))) for v in clipped.values())) * 1e-3
    assert norm == pytest.approx(1.0) and clipped["b"][0] < 0  # scaled down, not zeroed or NaN
    with pytest.raises(ValueError, match="NaN"):  # a client never sends an unbounded update
        clip_l2({"a": np.array([1.0, np.nan])}, 1.0)


def _he_privacy_file(tmp_path, resume=False):
    config = RunConfig(clients=10, rounds=3, out=str(tmp_path / "run"), he=HEConfig(enabled=True), resume=resume,
                       user_dp=UserDPConfig(enabled=True, noise_multiplier=1.0, clients_per_round=3))
    run_dir = RunDir(config.out)
    if not resume:
        run_dir.start(config, run_id="r1")
    return UserLevelPrivacyFile(config, run_dir), run_dir


def test_distributed_noise_is_booked_at_its_least_until_the_sum_is_known(tmp_path):
    """Under --he the round's model goes out for evaluation before the round ends, and the coordinator
    may still reject replies while summing; until the aggregate says how many shares it holds, the
    account must assume the fewest (one of the n asked for), never the replies that arrived."""
    hook, run_dir = _he_privacy_file(tmp_path)
    hook.on_train_messages(1, [object()] * 3)
    hook.on_train_replies(1, [train_reply(node, GLOBAL) for node in (1, 2, 3)])
    user = json.loads((run_dir.path / "user_privacy.json").read_text())["user_level"]
    least = epsilon([(1.0 * np.sqrt(1 / 3), 0.3, 1)], 1e-5)  # a sum holding 1 of 3 shares
    assert user["epsilon"] >= least > epsilon([(1.0, 0.3, 1)], 1e-5)


def test_a_resumed_run_whose_account_is_lost_counts_every_round_or_refuses(tmp_path):
    config = RunConfig(clients=10, rounds=5, out=str(tmp_path / "run"), resume=True,
                       user_dp=UserDPConfig(enabled=True, noise_multiplier=1.5, clients_per_round=2))
    run_dir = RunDir(config.out)
    run_dir.path.mkdir(parents=True)
    hook = UserLevelPrivacyFile(config, run_dir)  # resumed at round 4, user_privacy.json gone
    hook.on_train_replies(4, [])
    user = json.loads((run_dir.path / "user_privacy.json").read_text())["user_level"]
    assert user["epsilon"] >= epsilon([(1.5, 0.2, 4)], 1e-5)  # rounds 1-3, round 4 (maybe released), its re-run
    assert user["epsilon"] == epsilon([(1.5, 0.2, 5)], 1e-5)
    (run_dir.path / "user_privacy.json").unlink()
    with pytest.raises(UserError, match="cannot resume"):  # --he: the lost rounds' noise is unknown
        _he_privacy_file(tmp_path, resume=True)
