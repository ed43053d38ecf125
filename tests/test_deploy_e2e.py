"""A real deployment on loopback: `fedweights server` + two `fedweights client` processes over TLS
with node authentication (one on built-in data, one bringing its own `--data` file), an unregistered node refused, the final model published to a weight
registry, and clean shutdown on SIGTERM."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
from safetensors.torch import load_file

from fedweights.config import RunConfig
from fedweights.task import builtin_task

from fedweights.registry import Client

from .deploy_harness import Deployment, free_port
from .registry_support import TOKEN, registry  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow, pytest.mark.deploy]


def export_digits_shard(path, partition: int, partitions: int):
    """Write the digits train partition and test shard a lab would hold as a `--data` file."""
    config = RunConfig()
    data = builtin_task(config).client_data(partition, partitions, config)
    arrays = {}
    for split, dataset in (("train", data.train), ("test", data.test)):
        x, y = zip(*(dataset[i] for i in range(len(dataset))))
        arrays[f"x_{split}"], arrays[f"y_{split}"] = np.stack(x), np.array(y)
    np.savez(path, **arrays)
    return path


def test_two_clients_over_tls_with_node_auth(tmp_path, registry, monkeypatch):  # noqa: F811 - fixture
    (tmp_path / "token").write_text(TOKEN)
    monkeypatch.setenv("FEDWEIGHTS_REGISTRY_TOKEN_FILE", str(tmp_path / "token"))  # inherited by the server
    dep = Deployment(tmp_path)
    dep.make_keys(["n0", "n1", "intruder"], authorized=["n0", "n1"])
    address, run_dir = f"127.0.0.1:{free_port()}", tmp_path / "run"
    try:
        dep.server(address, "--rounds", "2", "--clients", "2", "--min-clients", "2", "--round-timeout", "120",
                   "--out", str(run_dir), "--publish", registry.address, "--name", "deploy/mlp")
        dep.client("n0", address, "0/2")
        dep.client("n1", address, None, "--data", str(export_digits_shard(tmp_path / "lab.npz", 1, 2)))
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
        with Client(registry.address) as reader:  # and published, with the run's lineage
            (version,) = reader.log("deploy/mlp")
            assert version.manifest.run_id == metrics["run_id"] and version.manifest.round == 2
            reader.pull("deploy/mlp", tmp_path / "pulled.safetensors")
        assert (tmp_path / "pulled.safetensors").read_bytes() == (run_dir / "model.safetensors").read_bytes()
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


def test_a_node_that_waited_for_the_server_is_not_refused_by_its_key_registration_race(tmp_path):
    """A client started long before the server (longer than --register-wait) may reach the new
    SuperLink just before `fedweights server` registered the node keys: that refusal is retried
    for --register-wait seconds from then, not taken as 'key not registered' (exit 5)."""
    from fedweights.deploy.processes import ProcessGroup, wait_healthy
    from fedweights.deploy.federation import write_flwr_home
    from fedweights.deploy.server import ServerSecurity, _register, _superlink_argv

    dep = Deployment(tmp_path)
    dep.make_keys(["n0"], authorized=["n0"])
    port = free_port()
    try:
        dep.client("n0", f"127.0.0.1:{port}", "0/1", "--register-wait", "15")
        time.sleep(17)  # no server yet: longer than --register-wait
        assert dep.procs["n0"].poll() is None, dep.log("n0")
        superexec_log = tmp_path / "state" / "n0" / "logs" / "superexec.log"
        started = _wait_for_text(superexec_log, "warm SuperExec ready").count("warm SuperExec ready")
        security = ServerSecurity(tmp_path / "tls", tmp_path / "authorized")
        home = tmp_path / "flwr-home"
        write_flwr_home(home, f"127.0.0.1:{port}", str(tmp_path / "tls" / "ca.crt"))
        with ProcessGroup(tmp_path / "superlink-logs", env={"FLWR_HOME": str(home)}) as group:
            superlink = group.start("superlink", _superlink_argv("127.0.0.1", port, tmp_path / "link.db", security))
            wait_healthy(f"https://127.0.0.1:{port}/health", superlink, "the SuperLink")
            deadline = time.monotonic() + 60
            while "the server refused this node" not in dep.log("n0") and dep.procs["n0"].poll() is None:
                assert time.monotonic() < deadline, dep.log("n0")
                time.sleep(0.2)
            assert dep.procs["n0"].poll() is None, dep.log("n0")  # refused once (key not yet registered) ...
            _register(group, security.validate())  # ... as `fedweights server` does just after the start
            deadline = time.monotonic() + 60
            while "Activated node_id" not in group.log_tail("superlink", 200):
                assert dep.procs["n0"].poll() is None, dep.log("n0")
                assert time.monotonic() < deadline, group.log_tail("superlink", 40)
                time.sleep(0.2)
        # the restarted SuperNode kept its warm SuperExec (seconds of imports), which reconnected to it
        assert _wait_for_text(superexec_log, "Connection successful after").count("warm SuperExec ready") == started
    finally:
        dep.close()


def _wait_for_text(path, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while text not in (content := path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} not in {path} after {timeout} s:\n{content[-3000:]}"
        time.sleep(0.2)
    return content
