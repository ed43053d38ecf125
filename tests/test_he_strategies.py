"""Server steps under --he with real TenSEAL: FedAvgM's momentum and DP-FedAvg's distributed noise.

The coordinator side is the real ``EncryptedSum`` (server context, no secret key); the clients'
side is the real payload + codec + ``decrypt_global``. Flower's own FedAvgM is the oracle.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvgM
from scipy import stats

from fedweights.config import HEConfig, RunConfig, StrategyConfig, UserDPConfig
from fedweights.crypto.aggregate import EncryptedSum, RoundExpectation
from fedweights.crypto.codec import encrypt_update, layout_of
from fedweights.crypto.keys import load_client_key, load_server_key, make_keys
from fedweights.flower.encrypted_state import MOMENTUM, UPDATE, client_payload, decrypt_global, extend_layout
from fedweights.privacy.distributed import clip_and_noise, effective_noise_multiplier, noise_share_std
from fedweights.strategies.encrypted import NOISE_ONLY, NORMALISER
from fedweights.strategies.encrypted_user_dp import EncryptedUserDPFedAvg

from .flower_messages import NodesGrid, array_record, train_reply
from .he_helpers import model_states


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    files = make_keys(tmp_path_factory.mktemp("he") / "keys")
    return load_client_key(files.secret), load_server_key(files.server)


def encrypted_round(keys, server_round, payloads, weights, normaliser, section, summed=None):
    """Clients encrypt ``payloads``; the coordinator sums those in ``summed``; a client decrypts."""
    client, server = keys
    model_layout = layout_of({k: v for k, v in payloads[0].items() if "::" not in k})
    total = EncryptedSum(server, RoundExpectation(server_round, extend_layout(model_layout, section), normaliser))
    for i in summed if summed is not None else range(len(payloads)):
        total.add(encrypt_update(client, payloads[i], weights[i], normaliser, server_round))
    return decrypt_global(client, total.result(), model_layout)


def test_fedavgm_under_he_is_flowers_fedavgm(keys):
    config = RunConfig(strategy=StrategyConfig(name="fedavgm", server_lr=0.7, server_momentum=0.9), he=HEConfig(enabled=True))
    start = model_states(1, seed=0)[0]
    counts = [30, 50, 20]
    oracle = FedAvgM(server_learning_rate=0.7, server_momentum=0.9, min_available_nodes=3)
    grid = NodesGrid([1, 2, 3])
    plain, encrypted, momentum = array_record({k: v.numpy() for k, v in start.items()}), dict(start), {}
    for server_round in (1, 2, 3):
        trained = [{k: v + 0.1 * d[k] for k, v in encrypted.items()} for d in model_states(3, seed=server_round)]
        oracle.configure_train(server_round, plain, ConfigRecord(), grid)
        replies = [train_reply(i + 1, {k: v.numpy() for k, v in t.items()}, counts[i]) for i, t in enumerate(trained)]
        plain, _ = oracle.aggregate_train(server_round, replies)
        payloads = [client_payload(config, encrypted, momentum, t) for t in trained]
        assert set(payloads[0]) == set(start) | {f"{MOMENTUM}::{k}" for k in start}
        encrypted, momentum = encrypted_round(keys, server_round, payloads, counts, sum(counts), MOMENTUM)
        expected = plain.to_torch_state_dict()
        for k in start:
            assert torch.allclose(encrypted[k], expected[k], atol=1e-5), k
    flower_momentum = oracle.momentum_vector
    assert all(np.allclose(momentum[k].numpy(), v, atol=1e-5) for k, v in zip(start, flower_momentum))


def user_dp_config(z=1.0, clip=0.5, m=2, population=10):
    return RunConfig(
        clients=population, rounds=2, he=HEConfig(enabled=True),
        user_dp=UserDPConfig(enabled=True, noise_multiplier=z, clipping_norm=clip, clients_per_round=m),
    )  # fmt: skip


def test_user_dp_under_he_is_the_fixed_denominator_step_even_when_a_client_drops_out(keys):
    config, z, clip, m = user_dp_config(), 1.0, 0.5, 2
    start = model_states(1, seed=0)[0]
    trained = [{k: v + 0.05 * d[k] for k, v in start.items()} for d in model_states(3, seed=7)]
    payloads = [client_payload(config, start, {}, t, cohort=3, rng=np.random.default_rng(i)) for i, t in enumerate(trained)]
    assert set(payloads[0]) == set(start) | {f"{UPDATE}::{k}" for k in start}
    new, momentum = encrypted_round(keys, 1, payloads, [1, 1, 1], 3, UPDATE, summed=[0, 2])  # client 1 dropped out
    assert momentum == {}
    std = noise_share_std(z, clip, 3)
    shares = [clip_and_noise({k: t[k].double() - start[k].double() for k in start}, clip, std, np.random.default_rng(i))
              for i, t in enumerate(trained)]
    for k in start:  # w + Σ_accepted (clip(Δ) + share) / m: the denominator stays m whoever replied
        expected = start[k].double() + (shares[0][k].double() + shares[2][k].double()) / m
        assert torch.allclose(new[k].double(), expected, atol=1e-5), k
    norms = [math.sqrt(sum(float(((t[k] - start[k]).double() ** 2).sum()) for k in start)) for t in trained]
    assert min(norms) > clip  # the updates really were clipped


def test_noise_shares_are_calibrated_and_their_encrypted_sum_has_std_z_times_s(keys):
    """Per-client share std = zS/sqrt(n); decrypted sum of n shares std = zS (chi-square bounds, false
    alarm 1e-6 each); a sum holding K < n shares has std zS·sqrt(K/n), the noise its accounting assumes."""
    z, clip, n = 1.3, 0.5, 4
    config = user_dp_config(z=z, clip=clip, m=n)

    def std_interval(sigma: float, d: int) -> tuple[float, float]:  # ±1.2 % of sigma at d = 10^5
        low, high = stats.chi2.ppf([0.5e-6, 1 - 0.5e-6], d - 1)
        return sigma * math.sqrt(low / (d - 1)), sigma * math.sqrt(high / (d - 1))

    zeros = {"w": torch.zeros(1000, 1000)}
    share = clip_and_noise(zeros, clip, noise_share_std(z, clip, n), np.random.default_rng(1))["w"].double().numpy()
    low, high = std_interval(z * clip / math.sqrt(n), share.size)  # ±0.4 % at 10^6 values
    assert low <= share.std(ddof=1) <= high and abs(share.mean()) < 5 * z * clip / math.sqrt(n * share.size)

    start = {"fc.weight": torch.randn(400, 250, generator=torch.Generator().manual_seed(0)) * 0.5}
    d = sum(v.numel() for v in start.values())

    payloads = [client_payload(config, start, {}, start, cohort=n, rng=np.random.default_rng(10 + i)) for i in range(n)]
    for summed, sigma in ((range(n), z * clip), ([0, 1], z * clip * math.sqrt(2 / n))):
        new, _ = encrypted_round(keys, 1, payloads, [1] * n, n, UPDATE, summed=list(summed))
        released = torch.cat([(new[k].double() - start[k].double()).reshape(-1) for k in start]).numpy() * n  # × m
        low, high = std_interval(sigma, d)
        assert low <= released.std(ddof=1) <= high, (released.std(ddof=1), sigma)
        assert effective_noise_multiplier(z, len(list(summed)), n) * clip == pytest.approx(sigma)


def test_noise_only_share_carries_no_data():
    config = user_dp_config(z=1.0, clip=0.5, m=1)
    start = model_states(1, seed=0)[0]
    trained = {k: v + 3.0 for k, v in start.items()}
    a = client_payload(config, start, {}, trained, cohort=1, noise_only=True, rng=np.random.default_rng(5))
    b = client_payload(config, start, {}, start, cohort=1, noise_only=False, rng=np.random.default_rng(5))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same share as a zero update: the data is not used


def test_encrypted_user_dp_strategy_poisson_samples_and_never_releases_a_noiseless_round(keys):
    _, server = keys
    arrays = array_record({k: v.numpy() for k, v in model_states(1, seed=0)[0].items()})
    grid = NodesGrid(range(1, 11))
    strategy = EncryptedUserDPFedAvg(server, 0.2, sampler=random.Random(3), min_available_nodes=10)
    sizes, noise_only = [], 0
    for server_round in range(1, 61):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        config = messages[0].content["config"]
        assert config[NORMALISER] == len(messages) >= 1  # the cohort the shares are calibrated for
        if config[NOISE_ONLY]:
            noise_only += 1
            assert len(messages) == 1
        else:
            sizes.append(len(messages))
    assert noise_only >= 1  # P(empty) = 0.8^10 ≈ 0.11 per round: such rounds happen and still carry noise
    assert 1.2 < np.mean(sizes) < 3.2  # Poisson: mean q·N = 2 (given non-empty: 2.24)
