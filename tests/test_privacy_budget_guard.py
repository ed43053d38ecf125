"""A client whose accountant state was lost believes it spent nothing. The coordinator sends each
node it recognises its ledger account, so the client resumes from it and stops at its budget by
itself; a node it cannot recognise trains past its budget, and then the coordinator records the
spend, does not use the update and says so, while a client with budget left keeps the run going."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import RecordDict

from fedweights.config import DPConfig, HEConfig, RunConfig
from fedweights.crypto.envelope import load_envelope, read_header
from fedweights.flower.round_loop import run_federation
from fedweights.flower.runtime import NODE_DATA, NODE_NAME, Runtime
from fedweights.privacy.accounting import epsilon
from fedweights.privacy.ledger import Ledger
from fedweights.privacy.plan import client_delta, round_plan
from fedweights.privacy.protocol import IDENTIFY, LEDGER_ACCOUNT, PRIVACY
from fedweights.progress import RichReporter
from fedweights.task import builtin_task

from .local_grid import LocalGrid, node_configs

pytestmark = pytest.mark.usefixtures("serverapp_process")


class ForgetfulGrid(LocalGrid):
    """Node 1 loses its context state (its DP accountant, in simulation) before round 2; with
    ``unrecognised`` the coordinator's ledger account never reaches it either (as for a node that
    came back under a new node id)."""

    def __init__(self, runtime, node_configs, unrecognised: bool) -> None:
        super().__init__(runtime, node_configs)
        self.unrecognised = unrecognised

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102 - Grid API
        for msg in messages:
            if msg.metadata.dst_node_id != 1 or msg.metadata.message_type != "train":
                continue
            if int(msg.content["config"]["server-round"]) == 2 and 1 in self.contexts:
                self.contexts[1].state = RecordDict()
            if self.unrecognised and LEDGER_ACCOUNT in msg.content:
                del msg.content[LEDGER_ACCOUNT]
        return super().send_and_receive(messages, timeout=timeout)


class RenumberingGrid(LocalGrid):
    """Node 1 comes back as node 11 after round 1, with no state: a restarted node on a fresh state
    dir whose SuperLink lost its database (Flower gives it a new node id). Counts identity queries."""

    def __init__(self, runtime, node_configs, unrecognised: bool) -> None:
        super().__init__(runtime, node_configs)
        self.queried: list[int] = []

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102 - Grid API
        replies = super().send_and_receive(messages, timeout=timeout)
        self.queried += [m.metadata.dst_node_id for m in messages if IDENTIFY in m.content]
        if any(m.metadata.message_type == "evaluate" for m in messages) and 1 in self.node_configs:
            self.node_configs[11] = self.node_configs.pop(1)  # gone after round 1's evaluation
            self.contexts.pop(1, None)
        return replies


def federate_with_a_forgetful_client(tmp_path, unrecognised: bool, he: HEConfig | None = None, grid=ForgetfulGrid):
    """Nodes 1, 2 on partitions 0/2, 1/2 and a node with all training examples (it spends ε slower);
    budget = ε of two rounds on a partition; node 1 forgets its accountant before round 2."""
    config = RunConfig(clients=3, rounds=3, min_clients=1, seed=5, out=str(tmp_path / "run"),
                       dp=DPConfig(enabled=True, noise_multiplier=1.0), he=he or HEConfig())
    task = builtin_task(config)
    n_part = len(task.client_data(0, 2, config).train)
    plan = round_plan(n_part, config)
    budget = epsilon([(plan.noise_multiplier, plan.sample_rate, 2 * plan.steps)], client_delta(n_part, config.dp))
    config = RunConfig(**{**config.__dict__, "dp": DPConfig(enabled=True, noise_multiplier=1.0, max_epsilon=budget * 1.0001)})
    # a third node holding all training examples spends slower: it still has budget in round 3
    x, y = task.train_data.tensors
    np.savez(tmp_path / "all.npz", x_train=x.numpy(), y_train=y.numpy())
    n_all = len(y)
    big = round_plan(n_all, config)
    assert epsilon([(big.noise_multiplier, big.sample_rate, 3 * big.steps)], client_delta(n_all, config.dp)) < budget

    nodes = node_configs(2)
    nodes[3] = {NODE_DATA: str(tmp_path / "all.npz"), NODE_NAME: "lab-all"}
    grid = grid(Runtime(config), nodes, unrecognised)
    run_federation(grid, Runtime(config), reporter=RichReporter())
    return config, plan, budget, grid


@pytest.mark.parametrize("grid", [ForgetfulGrid, RenumberingGrid], ids=["same-node-id", "new-node-id"])
def test_a_client_that_lost_its_accountant_resumes_from_the_ledger_and_stops_at_its_budget(tmp_path, grid):
    config, _plan, _budget, used_grid = federate_with_a_forgetful_client(tmp_path, unrecognised=False, grid=grid)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["num_clients"] for r in metrics["rounds"]] == [3, 3, 1]
    reasons = {f["node"]: f["reason"] for f in metrics["rounds"][2]["failures"]}
    node = "11" if grid is RenumberingGrid else "1"
    assert sorted(reasons) == sorted([node, "2"]) and all("privacy budget exhausted" in r for r in reasons.values())
    ledger = Ledger(config.out).read()
    assert not any(e.get("over_budget") for e in ledger)
    for entry in (e for e in ledger if e["status"] == "trained"):  # the client's own ε is the ledger's
        assert entry["client_epsilon"] == pytest.approx(entry["epsilon"], rel=1e-9)
    if grid is RenumberingGrid:  # asked once who it is, when it first came back; nobody else ever
        assert used_grid.queried == [11]


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "he"])
def test_a_client_the_coordinator_cannot_recognise_is_stopped_at_the_budget_by_the_ledger(tmp_path, key_pairs, encrypted):
    keys = key_pairs[0]
    he = HEConfig(enabled=True, key=str(keys.secret), server_key=str(keys.server)) if encrypted else None
    config, plan, budget, _grid = federate_with_a_forgetful_client(tmp_path, unrecognised=True, he=he)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and [r["num_clients"] for r in metrics["rounds"]] == [3, 3, 1]
    reasons = {f["node"]: f["reason"] for f in metrics["rounds"][2]["failures"]}
    assert "client 0 is over its privacy budget as the ledger accounts it" in reasons["1"]
    assert "its update is not used" in reasons["1"]
    assert "privacy budget exhausted" in reasons["2"]  # the client with its state refused by itself
    ledger = Ledger(config.out).read()
    (late,) = [e for e in ledger if e["client"] == "0" and e["round"] == 3]
    assert late["over_budget"] is True and late["client_epsilon"] <= budget * 1.0001 < late["epsilon"]
    assert sum(n for *_, n in late["history"]) == 3 * plan.steps  # its forgotten rounds still count
    report = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert report["clients"]["0"]["over_budget_rounds"] == [3]
    assert report["clients"]["0"]["epsilon"] == pytest.approx(late["epsilon"]) and report["epsilon_max"] >= late["epsilon"]
    assert "over budget r3, update not used" in (tmp_path / "run" / "report.html").read_text()
    if encrypted:  # the encrypted sum of round 3 holds only lab-all's update, weighted by its examples
        header = read_header(load_envelope(tmp_path / "run" / "model.he"))
        assert header.server_round == 3 and header.num_examples == len(builtin_task(config).train_data)


def test_a_client_takes_only_its_own_account_from_a_train_message():
    from fedweights.privacy.protocol import ledger_account_record, ledger_history

    content = RecordDict({LEDGER_ACCOUNT: ledger_account_record("0", [(1.0, 0.02, 45)])})
    assert ledger_history(content, "0") == [(1.0, 0.02, 45)]
    assert ledger_history(content, "1") == []  # another client's account is never applied
    assert ledger_history(RecordDict({}), "0") == []


class LyingGrid(LocalGrid):
    """Node 2 replaces the DP history in its train replies by ``claim`` (a broken or hostile client)."""

    def __init__(self, runtime, node_configs, claim) -> None:
        super().__init__(runtime, node_configs)
        self.claim = claim

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102 - Grid API
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.src_node_id == 2 and not reply.has_error() and PRIVACY in reply.content:
                reply.content[PRIVACY]["history"] = json.dumps(self.claim)
        return replies


@pytest.mark.parametrize(
    ("claim", "fragment"),
    [
        ([[1e300, 0.05, 23]], "noise multiplier must be > 0 and at most 1000"),
        ([[1.0, 1e-18, 10**19]], "sample rate must be in [1e-12, 1]"),  # crashed dp-accounting (overflow)
        ([[1.0, 0.05, 10**12]], "steps must be an integer from 0 to 1e+08"),  # PLD: minutes, and ε inflated
        ([[1.0, 0.05 + i * 1e-6, 1] for i in range(101)], "more than 100 distinct"),
    ],
    ids=["sigma", "tiny-rate", "steps", "entries"],
)
def test_a_client_claiming_an_impossible_dp_history_is_unaccounted_and_the_run_goes_on(tmp_path, claim, fragment):
    """Before, the coordinator's ledger raised on such a claim (or stalled on it) and the run ended."""
    config = RunConfig(clients=3, rounds=2, seed=5, out=str(tmp_path / "run"), dp=DPConfig(enabled=True, noise_multiplier=1.0))
    run_federation(LyingGrid(Runtime(config), node_configs(3), claim), Runtime(config), reporter=RichReporter())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and len(metrics["rounds"]) == 2
    ledger = Ledger(config.out).read()
    lying = [e for e in ledger if e["node"] == "2"]
    assert [e["status"] for e in lying] == ["unaccounted", "unaccounted"]
    assert all(fragment in e["reason"] and e["epsilon"] == "inf" for e in lying)
    assert sorted(e["client"] for e in ledger if e["status"] == "trained") == ["0", "0", "2", "2"]
