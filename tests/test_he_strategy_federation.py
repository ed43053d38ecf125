"""FedAvgM and user-level DP-FedAvg under --he in the real round loop, ClientApp and TenSEAL code
(``LocalGrid``: the ClientApp handlers called in this process, no Ray), plus the privacy reports
of user-level runs with and without record-level DP."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedweights.config import DPConfig, HEConfig, RunConfig, StrategyConfig, UserDPConfig
from fedweights.flower.encryption import decrypt_model_file
from fedweights.flower.round_loop import run_federation
from fedweights.flower.runtime import NODE_HE_KEY, NUM_PARTITIONS, PARTITION_ID, Runtime
from fedweights.privacy.accounting import epsilon
from fedweights.privacy.user_level_report import UserLevelPrivacyFile
from fedweights.progress import RichReporter
from fedweights.run_dir import RunDir
from fedweights.task import builtin_task

from .test_he_federation import LocalGrid

USER_LEVEL_KEYS = {"epsilon", "delta", "noise_multiplier", "clipping_norm", "sample_rate", "rounds", "population"}


pytestmark = pytest.mark.usefixtures("serverapp_process")


def federate(config: RunConfig, node_keys: dict[int, str] | None = None) -> RunDir:
    nodes = {n: {PARTITION_ID: n - 1, NUM_PARTITIONS: config.clients} for n in range(1, config.clients + 1)}
    for node, key in (node_keys or {}).items():
        nodes[node][NODE_HE_KEY] = key
    run_federation(LocalGrid(Runtime(config), nodes), Runtime(config), reporter=RichReporter())
    return RunDir(config.out)


def test_fedavgm_under_he_matches_fedavgm_in_plaintext(tmp_path, key_pairs):
    good, _ = key_pairs
    strategy = StrategyConfig(name="fedavgm", server_lr=1.0, server_momentum=0.9)
    he = HEConfig(enabled=True, key=str(good.secret), server_key=str(good.server))
    runs = {
        mode: federate(RunConfig(clients=3, rounds=3, seed=1, strategy=strategy, out=str(tmp_path / mode),
                                 he=he if mode == "he" else HEConfig()))
        for mode in ("he", "plain")
    }
    he_rounds, plain_rounds = (runs[m].read_metrics()["rounds"] for m in ("he", "plain"))
    assert he_rounds[-1]["eval_accuracy"] == pytest.approx(plain_rounds[-1]["eval_accuracy"], abs=0.01)
    assert he_rounds[-1]["eval_accuracy"] > 0.8 and not any(r["failures"] for r in he_rounds)
    model = builtin_task(RunConfig()).model_fn()
    decrypted = decrypt_model_file(runs["he"].path / "model.he", good.secret, model)  # momentum section dropped
    plain = runs["plain"].load_model()
    assert decrypted.keys() == plain.keys()
    assert all(torch.allclose(decrypted[k], plain[k], atol=1e-4) for k in plain)


def test_user_dp_under_he_accounts_the_noise_really_summed(tmp_path, key_pairs):
    """q = 1: every node is sampled; node 3 encrypts under a foreign key, so its share is rejected and
    each round's sum holds 2 of 3 shares: ε is accounted at z·sqrt(2/3), above the nominal run's."""
    good, stranger = key_pairs
    user_dp = UserDPConfig(enabled=True, noise_multiplier=1.0, clipping_norm=1.0, clients_per_round=3)
    config = RunConfig(clients=3, rounds=2, seed=2, out=str(tmp_path / "run"), user_dp=user_dp,
                       he=HEConfig(enabled=True, key=str(good.secret), server_key=str(good.server)))
    run_dir = federate(config, {3: str(stranger.secret)})
    rounds = run_dir.read_metrics()["rounds"]
    assert [r["num_clients"] for r in rounds] == [2, 2] and all(r["train_loss"] is None for r in rounds)
    user = json.loads((run_dir.path / "user_privacy.json").read_text())
    z_eff = 1.0 * math.sqrt(2 / 3)
    assert user["user_level"]["noise"] == "distributed" and "honest clients" in user["note"]
    assert user["user_level"]["history"] == [[z_eff, 1.0, 1], [z_eff, 1.0, 1]]
    assert user["user_level"]["epsilon"] == epsilon([(z_eff, 1.0, 2)], 1e-5) > epsilon([(1.0, 1.0, 2)], 1e-5)
    privacy = json.loads((run_dir.path / "privacy.json").read_text())
    assert set(privacy["user_level"]) >= USER_LEVEL_KEYS and privacy["user_level"] == user["user_level"]
    assert "honest clients" in privacy["guarantee"] and "clients" not in privacy  # user-level DP only
    assert "User-level ε" in (run_dir.path / "report.html").read_text()
    model = builtin_task(config).model_fn()
    model.load_state_dict(decrypt_model_file(run_dir.path / "model.he", good.secret, model))


def test_reports_merge_user_level_dp_with_and_without_record_level_dp(tmp_path, cli_in_process):
    # q = 1/2 may sample nobody (no record-level spend at all); with both, q = 1 so the ledger has entries
    for name, dp, m in (("user-only", DPConfig(), 1), ("both", DPConfig(enabled=True, noise_multiplier=1.0), 2)):
        user_dp = UserDPConfig(enabled=True, noise_multiplier=2.0, clipping_norm=1.0, clients_per_round=m)
        config = RunConfig(clients=2, rounds=2, seed=0, out=str(tmp_path / name), user_dp=user_dp, dp=dp)
        run_dir = federate(config)
        privacy = json.loads((run_dir.path / "privacy.json").read_text())
        user = privacy["user_level"]
        assert set(user) >= USER_LEVEL_KEYS and user["noise"] == "central"
        assert user["rounds"] == 2 and user["population"] == 2 and user["sample_rate"] == m / 2
        assert user["epsilon"] == epsilon([(2.0, m / 2, 2)], 1e-5)  # both rounds count, sampled set empty or not
        assert ("clients" in privacy) == (name == "both")
        assert "User-level (client-level) differential privacy" in privacy["guarantee"]
        assert ("Record-level" in privacy["guarantee"]) == (name == "both")
        html = (run_dir.path / "report.html").read_text()
        assert "User-level (client-level) DP" in html or "User-level ε" in html
        (run_dir.path / "privacy.json").unlink()
        code, out, err = cli_in_process("report", str(run_dir.path))
        out += err
        assert code == 0, out
        assert "user-level epsilon" in out and (run_dir.path / "privacy.json").exists()
        assert ("Privacy spent per client" in out) == (name == "both")


def _user_dp_run(tmp_path) -> tuple[RunConfig, RunDir]:
    """A started run directory of a central user-level DP run (z = 1.5, q = 2/10)."""
    config = RunConfig(clients=10, rounds=3, out=str(tmp_path / "run"),
                       user_dp=UserDPConfig(enabled=True, noise_multiplier=1.5, clients_per_round=2))
    run_dir = RunDir(config.out)
    run_dir.start(config, run_id="r1")
    return config, run_dir


def test_rounds_with_an_empty_sample_still_count(tmp_path):
    """Poisson sampling may pick nobody: the central DP-FedAvg round still releases a noised model, so
    the account counts it (the round loop calls the hook with no replies)."""
    config, run_dir = _user_dp_run(tmp_path)
    hook = UserLevelPrivacyFile(config, run_dir)
    for server_round in (1, 2):
        hook.on_train_replies(server_round, [])
    user = json.loads((run_dir.path / "user_privacy.json").read_text())["user_level"]
    assert user["rounds"] == 2 and user["epsilon"] == epsilon([(1.5, 0.2, 2)], 1e-5) > 0


def test_a_resumed_run_continues_the_user_level_account(tmp_path):
    """Resuming from the checkpoint of round 1 after round 2 was accounted: round 2 runs again and
    counts again (its first model may have been released), so ε covers 3 rounds, never 1."""
    import dataclasses

    config, run_dir = _user_dp_run(tmp_path)
    first = UserLevelPrivacyFile(config, run_dir)
    for server_round in (1, 2):
        first.on_train_replies(server_round, [])
    resumed = UserLevelPrivacyFile(dataclasses.replace(config, resume=True), run_dir)
    resumed.on_train_replies(2, [])
    user = json.loads((run_dir.path / "user_privacy.json").read_text())["user_level"]
    assert user["rounds"] == 3 and user["epsilon"] == epsilon([(1.5, 0.2, 3)], 1e-5)
    fresh = UserLevelPrivacyFile(config, run_dir)  # a new run in the same directory starts from zero
    fresh.on_train_replies(1, [])
    assert json.loads((run_dir.path / "user_privacy.json").read_text())["user_level"]["rounds"] == 1
