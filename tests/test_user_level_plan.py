"""`fedweights privacy plan --user-level`: ε (or z) of Poisson-sampled DP-FedAvg rounds."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant

from fedweights.privacy.accounting import epsilon
from fedweights.privacy.user_level import user_level_epsilon


@pytest.fixture
def cli(cli_in_process):
    """The CLI run in this process (fast)."""
    return cli_in_process


def direct_pld(q: float, z: float, rounds: int, delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return accountant.get_epsilon(delta)


def test_user_level_plan_gives_the_pld_epsilon_of_the_issue_example(cli):
    code, out, err = cli("privacy", "plan", "--user-level", "--population", "1000", "--clients-per-round", "10",
                         "--noise-multiplier", "1", "--rounds", "100", "--delta", "1e-5", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert set(plan) >= {"epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant"}  # as record-level
    assert plan["sample_rate"] == 0.01 and plan["steps"] == plan["rounds"] == 100 and plan["accountant"] == "pld"
    truth = direct_pld(0.01, 1.0, 100, 1e-5)
    assert truth <= plan["epsilon"] <= truth * 1.01  # never below PLD, within 1%
    assert plan["epsilon"] == pytest.approx(0.72, abs=0.01)
    # one accounting implementation: the same number as DP-SGD steps with the same (z, q, T)
    assert plan["epsilon"] == epsilon([(1.0, 0.01, 100)], 1e-5) == user_level_epsilon(0.01, 1.0, 100, 1e-5)


def test_user_level_plan_with_a_target_gives_the_smallest_noise_meeting_it(cli):
    code, out, err = cli("privacy", "plan", "--user-level", "--population", "100", "--clients-per-round", "10",
                         "--target-epsilon", "2", "--rounds", "30", "--delta", "1e-5", "--json")
    assert code == 0, err
    plan = json.loads(out)
    z = plan["noise_multiplier"]
    assert plan["target_epsilon"] == 2.0 and plan["epsilon"] <= 2.0
    assert direct_pld(0.1, z, 30, 1e-5) <= 2.0 < direct_pld(0.1, z * 0.99, 30, 1e-5)
    code, out, err = cli("privacy", "plan", "--user-level", "--population", "100", "--clients-per-round", "10",
                         "--target-epsilon", "2", "--rounds", "30", "--delta", "1e-5")
    assert code == 0 and "smallest noise multiplier" in out and "user-level epsilon" in out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--population", "10", "--clients-per-round", "11", "--rounds", "5"], "between 1 and the population 10"),
        (["--population", "10", "--clients-per-round", "2"], "needs --population, --clients-per-round and --rounds"),
        (["--population", "10", "--clients-per-round", "2", "--rounds", "5", "--steps", "3"], "record-level plans"),
        (["--population", "10", "--clients-per-round", "2", "--rounds", "5", "--delta", "2"], "delta must be in (0, 1)"),
    ],
)
def test_bad_user_level_plans_are_clear_errors(cli, args, fragment):
    base = ["privacy", "plan", "--user-level", "--noise-multiplier", "1"]
    code, out, err = cli(*base, *args, *([] if "--delta" in args else ["--delta", "1e-5"]))
    assert code == 2, out + err
    assert fragment in " ".join(err.split())


def test_population_options_without_user_level_are_refused(cli):
    code, out, err = cli("privacy", "plan", "--population", "10", "--noise-multiplier", "1", "--steps", "3",
                         "--delta", "1e-5")
    assert code == 2 and "add --user-level" in " ".join(err.split())
