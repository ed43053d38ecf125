"""Encrypted aggregation inside the real round loop, strategy and ClientApp code.

``LocalGrid`` delivers the coordinator's messages to fedweights' ClientApp handlers in this process
(each node with its own Flower Context and node config), so a federation with one misconfigured
node runs in seconds. The Ray-backed end-to-end runs are in test_he_simulate.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fedweights.config import DPConfig, HEConfig, RunConfig, StrategyConfig
from fedweights.errors import ConfigError, RunFailed
from fedweights.flower.encryption import decrypt_model_file
from fedweights.flower.round_loop import RoundHooks, run_federation
from fedweights.flower.runtime import NODE_HE_KEY, NUM_PARTITIONS, PARTITION_ID, Runtime
from fedweights.progress import RichReporter
from fedweights.proximal import PROXIMAL_MU_KEY
from fedweights.run_dir import RunDir
from fedweights.strategies import build_strategy
from fedweights.task import builtin_task

from .local_grid import LocalGrid

pytestmark = pytest.mark.usefixtures("serverapp_process")


def _federation(tmp_path, key_pairs, he: bool, nodes: int, **overrides) -> tuple[RunDir, RunConfig]:
    good, stranger = key_pairs
    he_config = HEConfig(enabled=he, key=str(good.secret), server_key=str(good.server)) if he else HEConfig()
    config = RunConfig(clients=3, rounds=2, seed=3, out=str(tmp_path / ("he" if he else "plain")), he=he_config, **overrides)
    node_configs = {n: {PARTITION_ID: n - 1, NUM_PARTITIONS: 3} for n in range(1, nodes + 1)}
    if nodes == 3:
        node_configs[3][NODE_HE_KEY] = str(stranger.secret)  # node 3 was handed another key pair
    run_federation(LocalGrid(Runtime(config), node_configs), Runtime(config), reporter=RichReporter())
    return RunDir(config.out), config


def test_a_node_with_a_foreign_key_is_rejected_and_the_round_goes_on(tmp_path, key_pairs):
    run_dir, config = _federation(tmp_path, key_pairs, he=True, nodes=3)
    metrics = run_dir.read_metrics()
    assert metrics["status"] == "completed"
    round1, round2 = metrics["rounds"]
    assert round1["num_clients"] == 2 and round2["num_clients"] == 2
    (reject,) = round1["failures"]
    assert reject["node"] == "3" and "update rejected: encrypted under another key" in reject["reason"]
    (refusal,) = round2["failures"]  # node 3 cannot read the aggregate either
    assert "cannot decrypt the global model" in refusal["reason"]
    # The coordinator only ever wrote the encrypted model; a client's key decrypts it.
    assert (run_dir.path / "model.he").exists() and not run_dir.model_path.exists()
    model = builtin_task(config).model_fn()
    encrypted_result = decrypt_model_file(run_dir.path / "model.he", config.he.key, model)

    # The same federation in plaintext with only the two good nodes gives the same model.
    plain_dir, _ = _federation(tmp_path, key_pairs, he=False, nodes=2, min_clients=2)
    plain = plain_dir.load_model()
    for name, tensor in plain.items():
        assert torch.allclose(encrypted_result[name], tensor, atol=1e-4), name
    assert json.loads(plain_dir.metrics_path.read_text())["rounds"][-1]["eval_accuracy"] == pytest.approx(
        round2["eval_accuracy"], abs=0.01
    )


class GrowNode3(RoundHooks):
    """After round 1, node 3's dataset grows (it takes half the data instead of a third)."""

    def __init__(self, grid: LocalGrid) -> None:
        self.grid = grid

    def on_round_end(self, record, arrays):  # noqa: D102
        if record.round == 1:
            self.grid.node_configs[3] = {PARTITION_ID: 1, NUM_PARTITIONS: 2}


def test_a_node_whose_data_grew_is_refused_once_then_weighted_by_its_new_count(tmp_path, key_pairs):
    good, _ = key_pairs
    config = RunConfig(clients=3, rounds=3, seed=3, out=str(tmp_path / "run"),
                       he=HEConfig(enabled=True, key=str(good.secret), server_key=str(good.server)))
    grid = LocalGrid(Runtime(config), {n: {PARTITION_ID: n - 1, NUM_PARTITIONS: 3} for n in (1, 2, 3)})
    run_federation(grid, Runtime(config), reporter=RichReporter(), hooks=[GrowNode3(grid)])
    rounds = RunDir(config.out).read_metrics()["rounds"]
    assert [r["num_clients"] for r in rounds] == [3, 2, 3]
    (refused,) = rounds[1]["failures"]
    assert refused["node"] == "3" and "range: the node now has 718 examples, more than the 479" in refused["reason"]


def test_round_fails_clearly_when_too_few_updates_survive_validation(tmp_path, key_pairs):
    with pytest.raises(RunFailed, match=r"round 1 got 2 usable update\(s\) of 3 sent; at least 3 needed.*another key"):
        _federation(tmp_path, key_pairs, he=True, nodes=3, min_clients=3)
    assert RunDir(tmp_path / "he").read_metrics()["status"] == "failed"


def test_coordinator_refuses_a_secret_key(tmp_path, key_pairs):
    good, _ = key_pairs
    config = RunConfig(clients=3, rounds=1, out=str(tmp_path / "run"), he=HEConfig(enabled=True, key=str(good.secret)))
    bad = dataclasses.replace(config, he=dataclasses.replace(config.he, server_key=str(good.secret)))
    grid = LocalGrid(Runtime(bad), {1: {PARTITION_ID: 0, NUM_PARTITIONS: 1}})
    with pytest.raises(Exception, match="holds the SECRET key"):
        run_federation(grid, Runtime(bad), reporter=RichReporter())


@pytest.mark.parametrize(
    ("strategy", "key", "reason"),
    [
        (StrategyConfig(name="trimmed-mean"), "strategy.name", "not linear in the updates"),
        (StrategyConfig(name="median"), "strategy.name", "not linear in the updates"),
        (StrategyConfig(max_norm=5.0), "strategy.max_norm", "cannot be checked on encrypted updates"),
        (StrategyConfig(max_norm_ratio=5.0), "strategy.max_norm_ratio", "cannot be checked on encrypted updates"),
        (StrategyConfig(max_model_norm_ratio=5.0), "strategy.max_model_norm_ratio", "cannot be checked on encrypted"),
    ],
)
def test_he_refuses_server_work_that_needs_plaintext(key_pairs, strategy, key, reason):
    good, _ = key_pairs
    config = RunConfig(strategy=strategy, he=HEConfig(enabled=True, key=str(good.secret), server_key=str(good.server)))
    with pytest.raises(ConfigError, match=reason) as info:
        build_strategy(config)
    assert info.value.key == key


def test_fedprox_under_he_sends_mu_to_the_clients(key_pairs):
    good, _ = key_pairs
    he = HEConfig(enabled=True, key=str(good.secret), server_key=str(good.server))
    strategy = build_strategy(RunConfig(strategy=StrategyConfig(name="fedprox", proximal_mu=0.3), he=he))
    assert strategy.train_config == {PROXIMAL_MU_KEY: 0.3} and not strategy.key.is_secret


def test_he_with_record_level_dp(tmp_path, key_pairs):
    """--he --dp: clients train with DP-SGD, then encrypt; the ledger and privacy report are written."""
    good, _ = key_pairs
    he = HEConfig(enabled=True, key=str(good.secret), server_key=str(good.server))
    config = RunConfig(clients=3, rounds=2, seed=3, out=str(tmp_path / "run"), he=he, dp=DPConfig(enabled=True))
    grid = LocalGrid(Runtime(config), {n: {PARTITION_ID: n - 1, NUM_PARTITIONS: 3} for n in (1, 2, 3)})
    run_federation(grid, Runtime(config), reporter=RichReporter())
    run_dir = RunDir(config.out)
    rounds = run_dir.read_metrics()["rounds"]
    assert [r["num_clients"] for r in rounds] == [3, 3] and not any(r["failures"] for r in rounds)
    privacy = json.loads((run_dir.path / "privacy.json").read_text())
    assert privacy and (run_dir.path / "model.he").exists()
    model = builtin_task(config).model_fn()
    model.load_state_dict(decrypt_model_file(run_dir.path / "model.he", good.secret, model))
