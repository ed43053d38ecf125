"""End-to-end DP runs on Flower's simulation engine: real Opacus clients, ledger, reports."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

from fedweights.config import RunConfig
from fedweights.privacy.accounting import default_delta, epsilon
from fedweights.privacy.ledger import Ledger
from fedweights.task import builtin_task

pytestmark = pytest.mark.slow


def client_sizes(config: RunConfig) -> list[int]:
    task = builtin_task(config)
    return [len(task.client_data(i, config.clients, config).train) for i in range(config.clients)]


def test_dp_run_of_four_clients_reports_every_epsilon(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("simulate", "--dp", "--noise-multiplier", "1.0", "--max-grad-norm", "1.0", "--clients", "4",
                 "--rounds", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Privacy spent per client" in result.stdout and "report.html" in result.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    accuracy = metrics["rounds"][-1]["eval_accuracy"]
    assert accuracy >= 0.5, f"DP accuracy {accuracy}"  # measured 0.67-0.75 (non-private: 0.95; chance: 0.1)

    privacy = json.loads((out / "privacy.json").read_text())
    sizes = client_sizes(RunConfig(clients=4))
    assert set(privacy["clients"]) == {"0", "1", "2", "3"}
    for client, n in enumerate(sizes):
        c = privacy["clients"][str(client)]
        rate, steps = 1 / math.ceil(n / 16), 5 * math.ceil(n / 16)
        assert c["delta"] == default_delta(n) and c["n_examples"] == n and c["rounds_participated"] == 5
        assert c["history"] == [[1.0, rate, steps]] and c["steps"] == steps and c["max_grad_norm"] == 1.0
        pld = PLDAccountant()
        pld.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(1.0)), steps))
        assert pld.get_epsilon(c["delta"]) <= c["epsilon"] <= 1.01 * pld.get_epsilon(c["delta"])
    eps_max = [r["epsilon_max"] for r in privacy["rounds"]]
    assert len(eps_max) == 5 and eps_max == sorted(eps_max) and eps_max[-1] == privacy["epsilon_max"]
    assert len(Ledger(out).read()) == 20  # 4 clients x 5 rounds, each written before aggregation
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2


def test_budget_stops_clients_one_by_one_then_the_run(cli, tmp_path):
    """Three clients with unequal data (label skew), so one round costs each a different ε. With a
    budget of 2.6 the smallest client stops after round 1 while the others go on, and the run
    ends cleanly when nobody may train any more."""
    config = RunConfig(clients=3, rounds=4, partition="dirichlet", alpha=0.3, seed=0)
    budget = 2.6
    trained_rounds = {}
    for client, n in enumerate(client_sizes(config)):
        steps = math.ceil(n / 16)
        spent = [epsilon([(1.0, 1 / steps, r * steps)], default_delta(n)) for r in range(1, 5)]
        trained_rounds[str(client)] = sum(e <= budget for e in spent)
    assert sorted(trained_rounds.values()) == [1, 3, 3]  # the scenario this test is about
    out = tmp_path / "run"
    result = cli("simulate", "--dp", "--max-epsilon", str(budget), "--clients", "3", "--rounds", "4",
                 "--partition", "dirichlet", "--alpha", "0.3", "--seed", "0", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["stopped_early"].startswith("round 4:")
    assert [r["num_clients"] for r in metrics["rounds"]] == [3, 2, 2]
    assert metrics["rounds"][1]["failures"][0]["reason"].startswith("privacy budget exhausted: client")

    privacy = json.loads((out / "privacy.json").read_text())
    for client, rounds in trained_rounds.items():
        c = privacy["clients"][client]
        assert c["rounds_participated"] == rounds and c["exhausted"] and c["exhausted_round"] == rounds + 1
        assert c["epsilon"] <= budget and c["budget"] == budget
    assert privacy["stopped_early"] == metrics["stopped_early"]
    assert "budget reached" in result.stdout
