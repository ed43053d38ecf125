"""Deployment building blocks without a federation: key material, refusals of insecure or
incomplete setups, the generated Flower App, node settings and process clean-up."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedweights.config import RunConfig, load_config, tomllib
from fedweights.crypto.keys import make_keys
from fedweights.deploy.client import ClientSecurity, NodeSettings
from fedweights.deploy.federation import write_app_dir, write_flwr_home
from fedweights.deploy.keys import authorized_keys, make_node_key, make_tls
from fedweights.deploy.processes import ProcessGroup, descendants
from fedweights.deploy.server import ServerSecurity
from fedweights.errors import UserError


def test_tls_keys_chain_to_the_ca_and_name_the_hosts(tmp_path):
    files = make_tls(tmp_path, ["coordinator.example", "10.1.2.3"], client=True)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    client = x509.load_pem_x509_certificate(files.client_cert.read_bytes())
    for cert in (server, client):
        cert.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator.example" in names.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("10.1.2.3") in names.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    for key in (files.server_key, files.client_key, tmp_path / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(UserError, match="--force"):
        make_tls(tmp_path)
    for bad in ("", "bad host name!"):  # a certificate for such a SAN matches no server
        with pytest.raises(UserError, match="is not an IP address or a DNS name"):
            make_tls(tmp_path / "other", [bad])
        assert not (tmp_path / "other").exists()


def test_node_key_is_private_p384_with_an_openssh_public_half(tmp_path):
    files = make_node_key(tmp_path, "site-a")
    assert stat.S_IMODE(files.private.stat().st_mode) == 0o600
    private = serialization.load_ssh_private_key(files.private.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(files.public.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert authorized_keys(tmp_path) == [files.public]
    with pytest.raises(UserError, match="node name"):
        make_node_key(tmp_path, "../escape")


def test_server_and_client_refuse_insecure_or_incomplete_setups(tmp_path):
    with pytest.raises(UserError, match="TLS is on by default"):
        ServerSecurity().validate()
    with pytest.raises(UserError, match="needs TLS"):
        ServerSecurity(authorized_nodes=tmp_path, insecure=True).validate()
    with pytest.raises(UserError, match="no server.pem"):
        (tmp_path / "ca.crt").write_text("x")
        ServerSecurity(tls_dir=tmp_path).validate()
    with pytest.raises(UserError, match="--root-cert"):
        ClientSecurity().validate()
    pair = make_node_key(tmp_path / "k", "n0")
    with pytest.raises(UserError, match="is not a PEM certificate"):  # a .pub given as the CA: would retry forever
        ClientSecurity(root_cert=pair.public).validate()
    cert = tmp_path / "ca.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    pair.private.chmod(0o644)
    with pytest.raises(UserError, match="chmod 600"):
        ClientSecurity(root_cert=cert, node_key=pair.private).validate()
    pair.private.chmod(0o600)
    ClientSecurity(root_cert=cert, node_key=pair.private).validate()
    with pytest.raises(UserError, match="not an unencrypted OpenSSH private key .that is a public key"):
        ClientSecurity(root_cert=cert, node_key=pair.public).validate()  # not "chmod 600 it"
    tls = make_tls(tmp_path / "tls", ["127.0.0.1"])
    with pytest.raises(UserError, match="not an unencrypted OpenSSH private key: give the private key `fedweights keys node`"):
        ClientSecurity(root_cert=cert, node_key=tls.server_key).validate()  # PEM, not OpenSSH: Flower's exit 302
    make_keys(tmp_path / "he")
    with pytest.raises(UserError, match="holds no secret key"):  # the coordinator's server.ctx given to a client
        NodeSettings(partition="0/2", he_key=tmp_path / "he" / "server.ctx", state_dir=tmp_path).node_config("n0")
    with pytest.raises(UserError, match="i/n"):
        NodeSettings(partition="2/2", state_dir=tmp_path).node_config("n0")
    with pytest.raises(UserError, match="--partition i/n"):
        NodeSettings(state_dir=tmp_path).node_config("n0")


def test_cli_says_how_to_get_tls(cli, tmp_path):
    result = cli("server", "--address", "127.0.0.1:1", "--out", str(tmp_path / "run"))
    assert result.returncode != 0 and "fedweights keys tls" in result.stderr and "Traceback" not in result.stderr
    result = cli("client", "--server", "127.0.0.1:1", "--partition", "0/2")
    assert result.returncode != 0 and "--root-cert" in result.stderr


def test_generated_app_carries_the_whole_run_config(tmp_path):
    config = load_config(None, {"rounds": 3, "dp.enabled": True, "dp.noise_multiplier": 1.5, "out": "/x/run"})
    app = write_app_dir(tmp_path / "app", config)
    data = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]
    assert data["app"]["components"]["serverapp"] == "fedweights.flower.server_app:app"
    flat = data["app"]["config"]
    assert RunConfig.from_flat(flat) == config
    home = write_flwr_home(tmp_path / "home", "127.0.0.1:9092", None)
    assert tomllib.loads(home.read_text())["superlink"]["fedweights"]["insecure"] is True


def test_process_group_stops_children_and_grandchildren(tmp_path):
    handler_before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or Ray's when a simulation ran in this worker
    with ProcessGroup(tmp_path) as group:
        proc = group.start("tree", [sys.executable, "-c", "import subprocess,time; subprocess.Popen(['sleep','60']); time.sleep(60)"])
        deadline = time.monotonic() + 10
        while not descendants(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        family = [proc.pid, *descendants(proc.pid)]
        assert len(family) == 2
        assert signal.getsignal(signal.SIGTERM) is not handler_before  # Ctrl-C/SIGTERM stop the group
    time.sleep(0.5)
    assert not [pid for pid in family if _alive(pid)]
    assert signal.getsignal(signal.SIGTERM) is handler_before  # our handler is gone again


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def test_server_refuses_a_run_it_cannot_resume_before_starting_flower(tmp_path, serverapp_process):
    """A completed run (or a damaged checkpoint) used to start a SuperLink, fail in the ServerApp, and
    exit 0 because metrics.json still said "completed" from the earlier run."""
    from fedweights.deploy.server import run_server
    from fedweights.flower.checkpoint import CheckpointError, resume_config
    from fedweights.flower.round_loop import run_federation
    from fedweights.flower.runtime import Runtime
    from fedweights.progress import RichReporter

    from .local_grid import LocalGrid, node_configs

    config = RunConfig(clients=2, rounds=1, out=str(tmp_path / "run"))
    run_federation(LocalGrid(Runtime(config), node_configs(2)), Runtime(config), reporter=RichReporter())
    with pytest.raises(CheckpointError, match="already completed all 1 round"):
        run_server(resume_config(config.out), "127.0.0.1:9", ServerSecurity(insecure=True))
    (manifest,) = (tmp_path / "run" / "checkpoint").glob("manifest.json")
    manifest.write_text("{")
    with pytest.raises(CheckpointError, match="is damaged"):
        run_server(resume_config(config.out, {"rounds": 2}), "127.0.0.1:9", ServerSecurity(insecure=True))
    assert not (tmp_path / "run" / "deploy").exists()  # no SuperLink was started


def test_process_group_children_die_with_a_parent_killed_without_clean_up(tmp_path):
    """kill -9 of `fedweights server` alone (not its process group) used to leave its SuperLink
    running, holding the port and continuing the run in the run directory."""
    script = ("import sys, time\nfrom pathlib import Path\nfrom fedweights.deploy.processes import ProcessGroup\n"
              "group = ProcessGroup(Path(sys.argv[1]))\n"
              "print(group.start('child', ['sleep', '60']).pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()  # SIGKILL: no ProcessGroup.close
    parent.wait()
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_server_refuses_an_address_in_use_before_starting_flower(tmp_path):
    """A SuperLink already on the port (e.g. left by a crashed server) answered the new server's
    health check, so the new run went to the old SuperLink."""
    from fedweights.deploy.server import run_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(UserError, match=r"cannot listen there \(Address already in use\): another server"):
            run_server(RunConfig(clients=1, rounds=1, out=str(tmp_path / "run")), address, ServerSecurity(insecure=True))
    assert not (tmp_path / "run" / "deploy" / "logs").exists()  # no Flower process was started


def test_a_log_tail_shows_only_what_the_latest_child_wrote(tmp_path):
    """Logs are appended across restarts; a refusal (`code: 2004`) logged by an earlier SuperNode
    attempt made a later, different failure read as 'key not registered'."""
    group = ProcessGroup(tmp_path)
    group.start("node", ["echo", "code: 2004 (an earlier refusal)"]).wait()
    assert "code: 2004" in group.log_tail("node")
    group.start("node", ["echo", "connection reset"]).wait()
    assert group.log_tail("node") == "connection reset"
    assert "code: 2004" in (tmp_path / "node.log").read_text()  # the log file keeps both
    group.close()


def test_a_client_whose_runtime_port_is_taken_starts_its_supernode_on_another(tmp_path):
    """The loopback port picked for the SuperNode's Runtime API was free a moment before Flower bound
    it; a process that took it in between made the client exit ('Runtime HTTP API failed to start')."""
    script = (
        "import sys\nfrom fedweights.deploy import client\nfrom fedweights.deploy.processes import free_port\n"
        "ports = iter([int(sys.argv[1])])\n"
        "def pick():\n    port = next(ports, None) or free_port()\n    print('runtime port', port, flush=True)\n    return port\n"
        "client.free_port = pick\n"
        "client.run_client(f'127.0.0.1:{free_port()}', client.ClientSecurity(insecure=True),\n"
        "                  client.NodeSettings(partition='0/2', state_dir=sys.argv[2]))\n"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = subprocess.Popen([sys.executable, "-c", script, str(port), str(tmp_path / "state")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            picked = (line.split()[-1] for line in node.stdout if line.startswith("runtime port"))
            assert next(picked) == str(port)
            retried = next(picked, "the client exited")  # picked once the first SuperNode has failed
            assert retried.isdigit(), retried + (tmp_path / "state" / "logs" / "supernode.log").read_text()
            deadline = time.monotonic() + 60
            while not _listening(int(retried)) and node.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert node.poll() is None and _listening(int(retried)), (tmp_path / "state" / "logs" / "supernode.log").read_text()
            assert f"('127.0.0.1', {port}): address already in use" in (tmp_path / "state" / "logs" / "supernode.log").read_text()
        finally:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
