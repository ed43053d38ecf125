"""Crash and resume, and dropouts, in a real deployment (server + client processes on loopback).

* kill -9 of the server's whole process group after round 1; `fedweights server --resume DIR`
  continues at round 2 with the same clients; with --dp the privacy ledger is continuous.
* a client killed mid-run: with --min-clients 1 the next round completes with the other client;
  with --min-clients 2 the run fails clearly after --round-timeout instead of hanging, and a second
  server resuming that run while it still runs is refused at once.
"""

from __future__ import annotations

import json
import os
import signal
import time

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
        for node in ("n0", "n1"):
            dep.signal_group(node, signal.SIGTERM)
            dep.wait(node, 30)
        time.sleep(3)
        assert dep.survivors() == [], "Flower processes of the killed server outlived it"
    finally:
        dep.close()


def test_a_client_dying_mid_run_does_not_hang_the_run(tmp_path):
    """Two federations side by side (their timeouts overlap): --min-clients 1 and --min-clients 2."""
    deps = {k: Deployment(tmp_path / f"min{k}") for k in (1, 2)}
    try:
        for k, dep in deps.items():
            dep.tmp.mkdir()
            dep.make_keys(["n0", "n1"], authorized=["n0", "n1"])
            address = f"127.0.0.1:{free_port()}"
            dep.server(address, "--rounds", "2", "--clients", "2", "--min-clients", str(k),
                       "--round-timeout", "90", "--out", str(dep.tmp / "run"))
            dep.client("n0", address, "0/2")
            dep.client("n1", address, "1/2")
        for dep in deps.values():
            dep.wait_for_round(dep.tmp / "run", 1, timeout=300)
            dep.signal_group("n1", signal.SIGKILL)  # one client dies for good
        # while --min-clients 2 waits out its round timeout, an operator tries to resume that run:
        # refused before it starts anything (the first server's SuperLink database is untouched)
        deps[2].server(f"127.0.0.1:{free_port()}", "--resume", str(deps[2].tmp / "run"), name="second")
        assert deps[2].wait("second", 60) == 2, deps[2].all_logs()
        assert "is in use by another run (pid" in " ".join(deps[2].log("second").split())
        codes = {k: dep.wait("server", 300) for k, dep in deps.items()}
        metrics = {k: json.loads((dep.tmp / "run" / "metrics.json").read_text()) for k, dep in deps.items()}
        # --min-clients 1: round 2 completes with the surviving client
        assert codes[1] == 0, deps[1].all_logs()
        assert metrics[1]["status"] == "completed"
        assert [r["num_clients"] for r in metrics[1]["rounds"]] == [2, 1]
        # --min-clients 2: the run fails after --round-timeout with a message saying why and what to do
        log = deps[2].log("server")
        assert codes[2] == 1, deps[2].all_logs()
        assert metrics[2]["status"] == "failed"
        assert "round 2 got 1 usable update(s) of 2 sent; at least 2 needed" in " ".join(log.split())
        assert "--resume" in log and "Traceback" not in log, log
    finally:
        for dep in deps.values():
            dep.close()


def test_a_killed_serverapp_process_fails_the_run_at_once(tmp_path):
    """kill -9 of the ServerApp process alone: the server marks the run failed within seconds
    (not Flower's ~1 min heartbeat timeout), says so in one line and exits 1."""
    from fedweights.deploy.processes import descendants

    dep = Deployment(tmp_path)
    dep.make_keys(["n0", "n1"], authorized=["n0", "n1"])
    address, run_dir = f"127.0.0.1:{free_port()}", tmp_path / "run"
    try:
        dep.server(address, "--rounds", "50", "--clients", "2", "--min-clients", "2", "--round-timeout", "120",
                   "--out", str(run_dir))
        dep.client("n0", address, "0/2")
        dep.client("n1", address, "1/2")
        dep.wait_for_round(run_dir, 1, timeout=300)
        apps = [p for p in descendants(dep.procs["server"].pid)
                if b"flwr-serverapp" in b" ".join(open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[:2])]
        assert len(apps) == 1, dep.all_logs()
        killed = time.monotonic()
        os.kill(apps[0], signal.SIGKILL)
        assert dep.wait("server", 30) == 1, dep.all_logs()
        assert time.monotonic() - killed < 20
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "failed", metrics
        assert f"the ServerApp process (pid {apps[0]}) died" in metrics["error"]
        assert "the checkpoint of round" in metrics["error"] and "server --resume" in metrics["error"]
        log = dep.log("server")
        assert "Traceback" not in log and "error: the run did not complete (status 'failed'): the ServerApp" in log, log
    finally:
        dep.close()
