"""ε accounting against Google's dp-accounting, σ calibration, δ defaults and bad input."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedweights.errors import UserError
from fedweights.privacy.accounting import (
    PLD_EPSILON_CEILING,
    calibrate_noise,
    covering_history,
    default_delta,
    epsilon,
    steps_for_epochs,
)


def reference(history, delta, accountant_cls):
    """ε of a history straight from a fresh dp-accounting accountant."""
    accountant = accountant_cls()
    for sigma, rate, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    ("history", "delta", "expected_pld"),
    [
        ([(1.1, 256 / 60000, int(60 * 60000 / 256))], 1e-5, 2.38),  # DP-SGD on MNIST, 60 epochs
        ([(1.0, 1 / 23, 115)], 1e-6, None),  # a digits client: 5 rounds x 23 steps
        ([(0.8, 0.01, 300), (1.5, 0.02, 200), (0.8, 0.01, 100)], 1e-5, None),  # σ changed mid-run
        # tiny sample rates (a client with ~10^7 examples at batch 16), where one step's PLD is
        # sparse and a small δ makes each composition's truncated tail mass show in ε
        ([(1.0, 1.6e-6, 100_000)], 1e-12, None),
        ([(1.1, 1e-6, 50), (1.0, 1.6e-6, 2)], 1e-12, None),
    ],
)
def test_pld_matches_dp_accounting_and_rdp_is_an_upper_bound(history, delta, expected_pld):
    ours = epsilon(history, delta, "pld")
    theirs = reference(history, delta, PLDAccountant)
    assert theirs <= ours <= theirs * 1.01  # never below dp-accounting's PLD, within 1 %
    if expected_pld is not None:
        assert ours == pytest.approx(expected_pld, abs=0.01)
    rdp = epsilon(history, delta, "rdp")
    rdp_reference = reference(history, delta, RdpAccountant)
    assert rdp_reference <= rdp <= rdp_reference * (1 + 1e-6)
    assert rdp >= ours


def test_a_history_of_millions_of_steps_at_a_tiny_sample_rate_is_accounted():
    """10^7 examples at batch 16 (q = 1.6e-6), 10 epochs: 6.25 million steps. dp-accounting 0.6
    alone spends ~26 s here (and minutes on longer histories, which a client could also claim)
    deciding how to compose; the value lies between a prefix's and the looser RDP bound's."""
    history = [(1.0, 1.6e-6, 6_250_000)]
    ours = epsilon(history, 1e-14, "pld")
    assert epsilon([(1.0, 1.6e-6, 625_000)], 1e-14, "pld") < ours < epsilon(history, 1e-14, "rdp")
    assert epsilon([(2.0, 1e-8, 100_000_000)], 1e-12, "pld") > 0


def test_history_order_and_splitting_do_not_change_epsilon():
    whole = epsilon([(1.0, 0.05, 200)], 1e-5)
    split = epsilon([(1.0, 0.05, 120), (1.0, 0.05, 80)], 1e-5)
    assert split == pytest.approx(whole, rel=1e-12)
    assert epsilon([], 1e-5) == 0.0


def test_covering_history_never_undercounts():
    reported = [(1.0, 0.05, 20)]  # a client that lost its state reports only this round
    seen = [(1.0, 0.05, 60), (2.0, 0.05, 10)]  # what the coordinator already recorded + this round
    covered = covering_history(reported, seen)
    assert sorted(covered) == [(1.0, 0.05, 60), (2.0, 0.05, 10)]
    assert epsilon(covered, 1e-5) >= max(epsilon(reported, 1e-5), epsilon(seen, 1e-5))


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_calibration_finds_the_smallest_noise_meeting_the_target(accountant):
    rate, steps, delta, target = 0.01, 1000, 1e-5, 1.0
    sigma = calibrate_noise(target, rate, steps, delta, accountant)
    assert epsilon([(sigma, rate, steps)], delta, accountant) <= target
    assert epsilon([(sigma * 0.997, rate, steps)], delta, accountant) > target  # smallest within 0.3 %
    if accountant == "pld":  # cross-check with dp-accounting's own calibration
        assert sigma == pytest.approx(1.4146, rel=2e-3)


def test_unreachable_target_is_a_clear_error():
    with pytest.raises(UserError, match="unreachable"):
        calibrate_noise(1e-4, 0.5, 10_000, 1e-5)


@pytest.mark.parametrize(("n", "delta"), [(100, 1e-5), (359, 1e-6), (1000, 1e-6), (1001, 1e-7), (60000, 1e-10)])
def test_default_delta_is_one_over_n_squared_rounded_down_capped_at_1e_5(n, delta):
    assert default_delta(n) == delta
    assert default_delta(n) <= 1 / n**2


@pytest.mark.parametrize(
    ("history", "delta", "fragment"),
    [
        ([(0.0, 0.01, 10)], 1e-5, "noise multiplier must be > 0"),
        ([(-1.0, 0.01, 10)], 1e-5, "noise multiplier must be > 0"),
        ([(1.0, 1.5, 10)], 1e-5, "sample rate"),
        ([(1.0, 0.01, 10)], 1.0, "delta must be in (0, 1)"),
    ],
)
def test_bad_accounting_input_is_refused(history, delta, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        epsilon(history, delta)


def test_without_meaningful_protection_pld_reports_the_rdp_upper_bound_quickly():
    """σ = 0.03 made dp-accounting's PLD run for minutes and need gigabytes; above ε = 50 the
    (never lower) RDP bound is reported instead, and calibration stays on the same footing."""
    weak = [(0.03, 0.0222, 45)]
    rdp = epsilon(weak, 1e-6, "rdp")
    assert epsilon(weak, 1e-6, "pld") == pytest.approx(rdp) and rdp > PLD_EPSILON_CEILING
    sigma = calibrate_noise(60.0, 0.0222, 45, 1e-6, "pld")
    assert epsilon([(sigma, 0.0222, 45)], 1e-6, "pld") <= 60.0
    for bad in (lambda: calibrate_noise(math.inf, 0.0222, 45, 1e-6), lambda: steps_for_epochs(0.0222, math.inf),
                lambda: epsilon([(1e300, 0.0222, 45)], 1e-6)):
        with pytest.raises(UserError):
            bad()


def test_plan_json_labels_an_rdp_bound_as_people_see_it(cli_in_process):
    """Above ε = 50 `privacy plan` reports the RDP bound under the pld accountant; its text says so,
    and its JSON must too, so a machine never takes that number for a PLD value."""
    import json

    args = ("privacy", "plan", "-q", "0.01", "--noise-multiplier", "0.2", "--steps", "1000", "--delta", "1e-5")
    code, out, err = cli_in_process(*args)
    assert code == 0, err
    assert "the RDP upper bound" in out
    code, out, err = cli_in_process(*args, "--json")
    assert code == 0, err
    weak = json.loads(out)
    assert weak["accountant"] == "pld" and weak["epsilon"] > PLD_EPSILON_CEILING
    assert weak["epsilon_bound"] == "rdp"
    code, out, err = cli_in_process("privacy", "plan", "-q", "0.01", "--noise-multiplier", "1", "--steps", "100",
                                    "--delta", "1e-5", "--json")
    assert code == 0, err
    assert "epsilon_bound" not in json.loads(out)  # a real PLD value carries no label


def test_plan_text_shows_the_calibrated_noise_rounded_up_on_both_lines(cli_in_process):
    """A σ copied from either line of `privacy plan --target-epsilon` must still meet the target."""
    import re

    code, out, err = cli_in_process("privacy", "plan", "-q", "0.01", "--target-epsilon", "1", "--steps", "1200",
                                    "--delta", "1e-5", "--accountant", "rdp")
    assert code == 0, err
    shown = [float(x) for x in re.findall(r"noise multiplier(?: for epsilon <= 1:)? (\d+\.\d+)", out)]
    assert len(shown) == 2 and shown[0] == shown[1], out
    assert shown[0] >= calibrate_noise(1.0, 0.01, 1200, 1e-5, "rdp")  # 1.6175402…
    assert epsilon([(shown[0], 0.01, 1200)], 1e-5, "rdp") <= 1.0
