"""Three hosts on one machine: the server and each client in its own network namespace, joined
by veth pairs to a bridge (itself in a fourth namespace), each with its own address. Clients
reach the server at its real address over TLS with node authentication; nothing uses loopback
between processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest

from .deploy_harness import Deployment

pytestmark = [pytest.mark.slow, pytest.mark.deploy]

SUBNET = "10.213.7"  # private to the namespaces this test creates
HOSTS = {"srv": 1, "c0": 2, "c1": 3}


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def hosts():
    """{host: (namespace, address)}; namespaces and links are removed afterwards."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:6]
    switch = f"fw{tag}-sw"
    namespaces = {host: f"fw{tag}-{host}" for host in HOSTS}
    try:
        for ns in [switch, *namespaces.values()]:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for host, ns in namespaces.items():
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p-{host}", "netns", switch)
            _ip("-n", switch, "link", "set", f"p-{host}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{HOSTS[host]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        yield {host: (ns, f"{SUBNET}.{HOSTS[host]}") for host, ns in namespaces.items()}
    finally:
        for ns in [*namespaces.values(), switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_server_and_clients_on_separate_hosts(tmp_path, hosts):
    srv_ns, srv_addr = hosts["srv"]
    dep = Deployment(tmp_path)
    dep.make_keys(["n0", "n1"], authorized=["n0", "n1"], hosts=[srv_addr])
    run_dir = tmp_path / "run"
    in_ns = {host: ("ip", "netns", "exec", ns) for host, (ns, _) in hosts.items()}
    try:
        dep.server("0.0.0.0:9092", "--rounds", "1", "--clients", "2", "--min-clients", "2", "--round-timeout", "120",
                   "--out", str(run_dir), prefix=in_ns["srv"])
        dep.client("n0", f"{srv_addr}:9092", "0/2", prefix=in_ns["c0"])
        dep.client("n1", f"{srv_addr}:9092", "1/2", prefix=in_ns["c1"])
        assert dep.wait("server", 420) == 0, dep.all_logs()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["rounds"][0]["num_clients"] == 2
    finally:
        dep.close()
