"""privacy.json, report.html and the `report` / `privacy plan` commands."""

from __future__ import annotations

import json
import re

import pytest

from fedweights.config import DPConfig, RunConfig
from fedweights.privacy.accounting import calibrate_noise, epsilon
from fedweights.privacy.ledger import LEDGER_FILE, Ledger
from fedweights.privacy.report import write_reports
from fedweights.run_dir import RoundRecord, RunDir

Q, DELTA = 1 / 23, 1e-6


@pytest.fixture
def cli(cli_in_process):
    """The CLI run in this process (fast)."""
    return cli_in_process


def trained(round_: int, client: str, steps_so_far: int) -> dict:
    history = [[1.0, Q, steps_so_far]]
    return {"run": "r1", "round": round_, "client": client, "status": "trained", "noise_multiplier": 1.0,
            "sample_rate": Q, "steps": 23, "history": history, "epsilon": epsilon(history, DELTA), "delta": DELTA,
            "accountant": "pld", "max_grad_norm": 1.0, "batch_size": 16, "local_epochs": 1, "n_examples": 360,
            "grad_sample_mode": "ghost", "budget": 3.0}


@pytest.fixture
def dp_run(tmp_path):
    """A finished 3-round DP run: client 1 reached its budget in round 3, client 0 did not."""
    run = RunDir(tmp_path)
    run.start(RunConfig(clients=2, rounds=3, dp=DPConfig(enabled=True, noise_multiplier=1.0, max_epsilon=3.0)), "r1")
    ledger = Ledger(tmp_path)
    for r in (1, 2, 3):
        run.append_round(RoundRecord(r, 1.0, 1.0, 0.3 * r, 2 if r < 3 else 1, 0.1))  # round 3: client 1 refused
        ledger.append([trained(r, "0", 23 * r)])
        if r < 3:
            ledger.append([trained(r, "1", 23 * r)])
    spent = epsilon([(1.0, Q, 46)], DELTA)
    ledger.append([{"run": "r1", "round": 3, "client": "1", "status": "exhausted", "epsilon": spent, "budget": 3.0,
                    "history": [[1.0, Q, 46]], "reason": f"privacy budget exhausted: client 1 has spent epsilon={spent}"}])
    run.set_status("completed")
    return tmp_path


def test_privacy_json_has_every_client_and_round(dp_run):
    json_path, _ = write_reports(dp_run)
    data = json.loads(json_path.read_text())
    assert data["accountant"] == "pld" and data["delta"] == DELTA and data["status"] == "completed"
    c0, c1 = data["clients"]["0"], data["clients"]["1"]
    assert c0["epsilon"] == pytest.approx(epsilon([(1.0, Q, 69)], DELTA))
    assert c0["steps"] == 69 and c0["rounds_participated"] == 3 and c0["history"] == [[1.0, Q, 69]]
    assert {k: c0[k] for k in ("noise_multiplier", "max_grad_norm", "sample_rate", "n_examples", "batch_size",
                               "local_epochs", "budget", "exhausted")} == {
        "noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": Q, "n_examples": 360, "batch_size": 16,
        "local_epochs": 1, "budget": 3.0, "exhausted": False}
    assert c1["exhausted"] and c1["exhausted_round"] == 3 and c1["rounds_participated"] == 2
    assert c1["epsilon"] == pytest.approx(epsilon([(1.0, Q, 46)], DELTA))
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3]
    assert data["rounds"][2]["epsilon_max"] == pytest.approx(c0["epsilon"])
    assert data["rounds"][2]["epsilon_mean"] == pytest.approx((c0["epsilon"] + c1["epsilon"]) / 2)
    assert data["rounds"][2]["exhausted"] == 1
    assert data["ledger"]["entries"] == 6


def test_report_html_is_self_contained(dp_run):
    _, html_path = write_reports(dp_run)
    page = html_path.read_text()
    assert len(re.findall(r"src='data:image/png;base64,[A-Za-z0-9+/=]{1000,}'", page)) == 2  # ε and accuracy plots
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # nothing to fetch
    assert "Record-level differential privacy" in page and "except with probability at most δ" in page
    assert "reached their privacy budget" in page and "noise_multiplier" in page


def test_report_cli_prints_the_table_and_refuses_a_run_without_dp(cli, dp_run, tmp_path_factory):
    code, out, err = cli("report", str(dp_run))
    assert code == 0, err
    assert "Privacy spent per client" in out and "budget reached r3" in out and "report.html" in out

    plain = tmp_path_factory.mktemp("plain")
    RunDir(plain).start(RunConfig(), "r2")
    code, out, err = cli("report", str(plain))
    assert code == 2 and "has no privacy ledger" in err


def test_report_refuses_a_ledger_whose_last_line_was_edited_or_dropped(cli, dp_run):
    """The hash chain protects every line but the last; privacy.json's seal and the last line's
    own history cover that one, so a lowered or removed final spend is never reported."""
    path = dp_run / LEDGER_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    code, _, err = cli("report", str(dp_run))  # privacy.json now seals the ledger's 6 lines
    assert code == 0, err
    path.write_bytes(b"".join(lines[:-1]))  # the final line dropped
    code, _, err = cli("report", str(dp_run))
    assert code == 2 and "no longer holds the 6 line(s) that privacy.json sealed" in err

    (dp_run / "privacy.json").unlink()  # no seal: the last line's own history still gives it away
    last = json.loads(lines[-2])
    edited = lines[-2].replace(json.dumps(last["epsilon"]).encode(), b"0.01")
    path.write_bytes(b"".join(lines[:-2]) + edited)
    code, _, err = cli("report", str(dp_run))
    assert code == 2 and "line 5: epsilon 0.01 is below" in err and "was edited" in err

    path.write_bytes(b"".join(lines))  # the intact ledger, which a later round may extend
    assert cli("report", str(dp_run))[0] == 0
    Ledger(dp_run).append([trained(4, "0", 23 * 4)])
    assert cli("report", str(dp_run))[0] == 0


def test_without_its_seal_the_ledger_is_checked_against_the_rounds_metrics_json_records(cli, dp_run):
    """Deleting or damaging privacy.json must not make a shortened ledger acceptable: every update a
    round used (metrics.json) has its ledger line, and a damaged seal is reported, not overwritten."""
    path = dp_run / LEDGER_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    assert cli("report", str(dp_run))[0] == 0
    (dp_run / "privacy.json").write_text("garbage")
    code, _, err = cli("report", str(dp_run))
    assert code == 2 and "privacy.json is damaged" in err and "move it aside" in err
    assert (dp_run / "privacy.json").read_text() == "garbage"  # left as it was found

    (dp_run / "privacy.json").unlink()
    path.write_bytes(b"".join(lines[:-2]))  # round 3's trained line and the refusal after it, dropped
    code, _, err = cli("report", str(dp_run))
    assert code == 2 and "holds 0 accounted line(s) for round 3, but metrics.json says that round used 1" in err
    assert not (dp_run / "privacy.json").exists()

    path.write_bytes(b"")  # every line gone
    code, _, err = cli("report", str(dp_run))
    assert code == 2 and "holds no lines, but metrics.json records 3 round(s) of this --dp run" in err


@pytest.mark.parametrize(("change", "problem"), [
    (lambda m: {**m, "rounds": "oops"}, "'rounds' should be a JSON array, got str"),
    (lambda m: {**m, "rounds": [{"round": "1"}]}, "every entry of 'rounds' should be an object with an integer 'round'"),
    (lambda m: {**m, "config": {**m["config"], "dp": None}}, "config section 'dp' should be a JSON object"),
])
def test_a_metrics_file_of_the_wrong_shape_is_reported_as_damaged(cli, dp_run, change, problem):
    metrics = dp_run / "metrics.json"
    metrics.write_text(json.dumps(change(json.loads(metrics.read_text()))))
    code, _, err = cli("report", str(dp_run))
    assert code == 2 and f"metrics.json is damaged ({problem})" in err and "Traceback" not in err


def test_privacy_plan_cli_uses_the_run_accounting(cli):
    code, out, err = cli("privacy", "plan", "--sample-rate", str(256 / 60000), "--noise-multiplier", "1.1", "--epochs",
                         "60", "--delta", "1e-5", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert set(plan) >= {"epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant"}
    assert plan["steps"] == 14063 and plan["accountant"] == "pld"
    assert plan["epsilon"] == pytest.approx(2.38, abs=0.01)
    assert plan["epsilon"] == epsilon([(1.1, 256 / 60000, 14063)], 1e-5)

    code, out, err = cli("privacy", "plan", "-q", "0.01", "--target-epsilon", "1", "--steps", "1000", "--delta", "1e-5",
                         "--accountant", "rdp", "--json")
    plan = json.loads(out)
    assert plan["noise_multiplier"] == pytest.approx(calibrate_noise(1.0, 0.01, 1000, 1e-5, "rdp"))
    assert plan["epsilon"] <= 1.0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["privacy", "plan", "-q", "0.01", "--noise-multiplier", "0", "--steps", "10", "--delta", "1e-5"], "noise multiplier must be > 0"),
        (["privacy", "plan", "-q", "0.01", "--noise-multiplier", "1", "--steps", "10", "--delta", "1"], "delta must be in (0, 1)"),
        (["privacy", "plan", "-q", "0.5", "--target-epsilon", "0.0001", "--steps", "10000", "--delta", "1e-5"], "unreachable"),
        (["simulate", "--dp", "--noise-multiplier", "-1"], "'dp.noise_multiplier' must be > 0"),
        (["simulate", "--dp", "--max-grad-norm", "0"], "'dp.max_grad_norm' must be > 0"),
        (["simulate", "--dp", "--delta", "1.5"], "'dp.delta' must be in (0, 1)"),
        (["simulate", "--dp", "--target-epsilon", "0.0001"], "'dp.target_epsilon' of 0.0001 is unreachable"),
        (["simulate", "--dp", "--noise-multiplier", "1", "--max-epsilon", "0.01"], "below what one round costs"),
        (["privacy", "plan", "-q", "1e-13", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"],
         "sample rate must be in [1e-12, 1]"),
        (["privacy", "plan", "-q", "0.01", "--noise-multiplier", "1", "--steps", "1000000000", "--delta", "1e-5"],
         "steps must be an integer from 0 to 1e+08"),
        (["simulate", "--dp", "--rounds", "100000", "--local-epochs", "100"], "more than the 1e+08 fedweights accounts"),
    ],
)
def test_bad_dp_input_fails_before_training(cli, args, fragment, tmp_path):
    code, out, err = cli(*args, "--out", str(tmp_path / "run")) if args[0] == "simulate" else cli(*args)
    assert code == 2, out + err
    assert fragment in " ".join(err.split())  # rich may wrap the line
    assert not (tmp_path / "run" / "metrics.json").exists()  # nothing started
