"""The coordinator enforces max_epsilon from its own ledger: a client whose accountant state was
lost (it believes it spent nothing) trains past its budget; the coordinator records the spend, does
not use the update, and the report says so — while a client with budget left keeps the run going."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import RecordDict

from fedweights.config import DPConfig, RunConfig
from fedweights.flower.round_loop import run_federation
from fedweights.flower.runtime import NODE_DATA, NODE_NAME, Runtime
from fedweights.privacy.accounting import epsilon
from fedweights.privacy.ledger import Ledger
from fedweights.privacy.plan import client_delta, round_plan
from fedweights.progress import RichReporter
from fedweights.task import builtin_task

from .local_grid import LocalGrid, node_configs

pytestmark = pytest.mark.usefixtures("serverapp_process")


class ForgetfulGrid(LocalGrid):
    """Node 1 loses its context state (its DP accountant, in simulation) before round 2."""

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102 - Grid API
        for msg in messages:
            if msg.metadata.dst_node_id == 1 and msg.metadata.message_type == "train" \
                    and int(msg.content["config"]["server-round"]) == 2 and 1 in self.contexts:
                self.contexts[1].state = RecordDict()
        return super().send_and_receive(messages, timeout=timeout)


def test_a_client_that_lost_its_accountant_is_stopped_at_the_budget_by_the_ledger(tmp_path):
    config = RunConfig(clients=3, rounds=3, min_clients=1, seed=5, out=str(tmp_path / "run"),
                       dp=DPConfig(enabled=True, noise_multiplier=1.0))
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
    run_federation(ForgetfulGrid(Runtime(config), nodes), Runtime(config), reporter=RichReporter())

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
