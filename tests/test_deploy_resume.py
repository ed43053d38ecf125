"""Crash and resume, and dropouts, in a real deployment (server + client processes on loopback).

* kill -9 of the server's whole process group after round 1; `fedweights server --resume DIR`
  continues at round 2 with the same clients; with --dp the privacy ledger is continuous.
* a client killed mid-run: with --min-clients 1 the next round completes with the other client;
  with --min-clients 2 the run fails clearly after --round-timeout instead of hanging.
"""

from __future__ import annotations

import json
import signal

import pytest

from .deploy_harness import Deployment, free_port

pytestmark = [pytest.mark.slow, pytest.mark.deploy]


def _ledger(run_dir):
    return [json.loads(line) for line in (run_dir / "privacy-ledger.jsonl").read_text().splitlines() if line]


def test_kill_9_then_resume_continues_with_a_continuous_privacy_ledger(tmp_path):
    dep = Deployment(tmp_path)
    dep.make_keys(["n0", "n1"], authorized=["n0", "n1"])
    address, run_dir = f"127.0.0.1:{free_port()}", tmp_path / "run"
    try:
        dep.server(address, "--rounds", "2", "--clients", "2", "--min-clients", "2", "--round-timeout", "120",
                   "--dp", "--noise-multiplier", "1.0", "--out", str(run_dir))
        dep.client("n0", address, "0/2")
        dep.client("n1", address, "1/2")
        dep.wait_for_round(run_dir, 1, timeout=300)
        dep.signal_group("server", signal.SIGKILL)  # a crash: no clean-up code runs
        dep.procs["server"].wait()
        before = _ledger(run_dir)
        assert {e["round"] for e in before} == {1}
        dep.server(address, "--resume", str(run_dir), name="resumed")
        assert dep.wait("resumed", 420) == 0, dep.all_logs()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "completed"
        assert [r["round"] for r in metrics["rounds"]] == [1, 2]
        ledger = _ledger(run_dir)
        assert ledger[: len(before)] == before  # the ledger is continued, not restarted
        assert [e["seq"] for e in ledger] == list(range(len(ledger)))
        for client in ("0", "1"):
            rounds = [e for e in ledger if e["client"] == client and e["status"] == "trained"]
            assert [e["round"] for e in rounds][:1] == [1] and rounds[-1]["round"] == 2
            # the client's own accountant survived the server restart: its history grew, ε grew
            assert len(rounds[-1]["history"]) > 0 and rounds[-1]["epsilon"] > rounds[0]["epsilon"]
            assert rounds[-1]["client_epsilon"] >= rounds[0]["client_epsilon"]
            assert sum(s for _, _, s in rounds[-1]["history"]) > sum(s for _, _, s in rounds[0]["history"])
    finally:
        dep.close()


@pytest.mark.parametrize("min_clients", [1, 2])
def test_a_client_dying_mid_run_does_not_hang_the_run(tmp_path, min_clients):
    dep = Deployment(tmp_path)
    dep.make_keys(["n0", "n1"], authorized=["n0", "n1"])
    address, run_dir = f"127.0.0.1:{free_port()}", tmp_path / "run"
    try:
        dep.server(address, "--rounds", "2", "--clients", "2", "--min-clients", str(min_clients),
                   "--round-timeout", "60", "--out", str(run_dir))
        dep.client("n0", address, "0/2")
        dep.client("n1", address, "1/2")
        dep.wait_for_round(run_dir, 1, timeout=300)
        dep.signal_group("n1", signal.SIGKILL)
        code = dep.wait("server", 300)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        log = dep.log("server")
        if min_clients == 1:
            assert code == 0, dep.all_logs()
            assert metrics["status"] == "completed"
            assert [r["num_clients"] for r in metrics["rounds"]] == [2, 1]
        else:
            assert code == 1, dep.all_logs()
            assert metrics["status"] == "failed"
            assert "round 2" in log and "--resume" in log and "Traceback" not in log, log
    finally:
        dep.close()
