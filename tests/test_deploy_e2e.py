"""A real deployment on loopback: `fedweights server` + two `fedweights client` processes over TLS
with node authentication, an unregistered node refused, and clean shutdown on SIGTERM."""

from __future__ import annotations

import json
import signal
import time

import pytest
from safetensors.torch import load_file

from .deploy_harness import Deployment, free_port

pytestmark = [pytest.mark.slow, pytest.mark.deploy]


def test_two_clients_over_tls_with_node_auth(tmp_path):
    dep = Deployment(tmp_path)
    dep.make_keys(["n0", "n1", "intruder"], authorized=["n0", "n1"])
    address, run_dir = f"127.0.0.1:{free_port()}", tmp_path / "run"
    try:
        dep.server(address, "--rounds", "2", "--clients", "2", "--min-clients", "2", "--round-timeout", "120",
                   "--out", str(run_dir))
        dep.client("n0", address, "0/2")
        dep.client("n1", address, "1/2")
        dep.client("intruder", address, "0/2", "--register-wait", "0")
        assert dep.wait("intruder", 120) == 5, dep.log("intruder")
        assert "this node's public key is not registered on the server" in dep.log("intruder")
        assert dep.wait("server", 480) == 0, dep.all_logs()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "completed"
        assert [r["round"] for r in metrics["rounds"]] == [1, 2]
        assert all(r["num_clients"] == 2 for r in metrics["rounds"])
        assert metrics["rounds"][-1]["eval_accuracy"] > 0.6  # digits, 2 rounds: ~0.9
        assert load_file(run_dir / "model.safetensors")  # the global model, as `simulate` writes it
        started = time.monotonic()
        for node in ("n0", "n1"):
            dep.signal_group(node, signal.SIGTERM)
        for node in ("n0", "n1"):
            assert dep.wait(node, 30) in (0, 130, -signal.SIGTERM), dep.log(node)
        assert time.monotonic() - started < 30
        time.sleep(2)
        assert dep.survivors() == [], "processes left behind after SIGTERM"
    finally:
        dep.close()
