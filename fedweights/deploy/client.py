"""``fedweights client``: a Flower SuperNode that runs the fedweights ClientApp on this node's data.

The node's settings travel as Flower node config (keys in ``fedweights.flower.runtime``): which
partition of the built-in/task data it holds or the path of its own data, its device, its HE
secret key and a state directory that keeps its DP accountant across restarts.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from rich.console import Console

from ..errors import UserError
from ..flower import runtime as keys
from .processes import ProcessGroup, free_port, split_address

EXIT_AUTH_FAILED = 305  # Flower: the SuperLink refused this node (API error 2004)
REGISTER_WAIT_SECONDS = 60.0
# Flower's SuperNode cannot listen on the loopback port chosen for its Runtime API (another process
# took it between our check and its bind): uvicorn's message; the node is started again on another port.
RUNTIME_PORT_TAKEN = "error while attempting to bind on address ('127.0.0.1', {port})"
RUNTIME_PORT_TRIES = 5


class NodeNotAuthorized(UserError):
    """The server refused this node: its public key is not registered there."""

    exit_code = 5

NOT_REGISTERED = (
    "this node's public key is not registered on the server: ask the operator to add {pub} to the "
    "server's --authorized-nodes directory (and restart the server), then start this client again"
)


@dataclass(frozen=True)
class ClientSecurity:
    """How this node trusts the server (``--root-cert`` CA) and proves who it is (``--node-key``)."""

    root_cert: Path | None = None
    node_key: Path | None = None
    insecure: bool = False

    def validate(self) -> None:
        """TLS unless --insecure; the files must exist; the private key must be private."""
        if self.insecure and (self.root_cert or self.node_key):
            raise UserError("--insecure contradicts --root-cert/--node-key: node keys need TLS; give one or the other")
        if not self.insecure and not self.root_cert:
            raise UserError(
                "TLS is on by default: give --root-cert CA.crt (the server operator's ca.crt), "
                "or --insecure to talk to an insecure server"
            )
        for option, path in (("--root-cert", self.root_cert), ("--node-key", self.node_key)):
            if path is not None and not Path(path).is_file():
                raise UserError(f"{option} {path} does not exist")
        if self.root_cert is not None and b"BEGIN CERTIFICATE" not in Path(self.root_cert).read_bytes()[:65536]:
            raise UserError(f"--root-cert {self.root_cert} is not a PEM certificate: give the CA's ca.crt (from `fedweights keys tls`)")
        if self.node_key is not None:
            _check_node_key(Path(self.node_key))


def _check_node_key(path: Path) -> None:
    """The key Flower's SuperNode loads: an OpenSSH elliptic-curve private key, readable by us alone."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        public = " (that is a public key: it goes in the server's --authorized-nodes folder)" if path.suffix == ".pub" else ""
        raise UserError(f"--node-key {path} is not an unencrypted OpenSSH private key{public}: give the private key "
                        f"`fedweights keys node` wrote ({type(exc).__name__}: {exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UserError(f"--node-key {path} is a {type(key).__name__.lstrip('_')}; Flower's node authentication needs "
                        "an elliptic-curve key: make one with `fedweights keys node`")
    if path.stat().st_mode & 0o077:
        raise UserError(f"--node-key {path} is readable by others: chmod 600 it")


@dataclass(frozen=True)
class NodeSettings:
    """What this node trains on and where it keeps its state."""

    partition: str | None = None  # "i/n"
    data: Path | None = None
    device: str | None = None
    he_key: Path | None = None
    state_dir: Path | None = None

    def node_config(self, name: str) -> dict[str, str | int]:
        """Flower node config for these settings (checked)."""
        if self.partition is None and self.data is None:
            raise UserError("say what this node trains on: --partition i/n (built-in data) or --data FILE.npz")
        if self.partition is not None and self.data is not None:
            raise UserError("give one of --partition (built-in data) and --data (this node's own file), not both")
        config: dict[str, str | int] = {keys.NODE_NAME: name}
        if self.partition is not None:
            match = re.fullmatch(r"(\d+)/(\d+)", self.partition)
            if not match or not int(match[1]) < int(match[2]):
                raise UserError(f"--partition must look like i/n with 0 <= i < n (e.g. 0/2), got {self.partition!r}")
            config[keys.PARTITION_ID], config[keys.NUM_PARTITIONS] = int(match[1]), int(match[2])
        if self.data is not None:
            if not Path(self.data).is_file():
                raise UserError(f"--data {self.data} {'is a folder, not a .npz file' if Path(self.data).is_dir() else 'does not exist'}")
            from ..data.node_data import load_node_data  # torch: only for nodes with their own data

            load_node_data(str(Path(self.data).resolve()))  # a bad file fails here, before connecting
            config[keys.NODE_DATA] = str(Path(self.data).resolve())
        if self.device is not None:
            if self.device not in ("auto", "cpu", "cuda"):
                raise UserError(f"--device must be auto, cpu or cuda, got {self.device!r}")
            config[keys.NODE_DEVICE] = self.device
        if self.he_key is not None:
            if not Path(self.he_key).is_file():
                raise UserError(f"--he-key {self.he_key} does not exist (make keys with `fedweights keys he`)")
            from ..crypto.keys import load_client_key  # tenseal: only for nodes of encrypted runs

            load_client_key(self.he_key)  # server.ctx or a world-readable key: refused before connecting
            config[keys.NODE_HE_KEY] = str(Path(self.he_key).resolve())
        state_dir = Path(self.state_dir or Path.home() / ".fedweights" / "nodes" / name).resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
        config[keys.NODE_STATE_DIR] = str(state_dir)
        return config


def node_name(security: ClientSecurity, settings: NodeSettings) -> str:
    """A name for this node's state and logs: its key's file name, else its partition."""
    if security.node_key is not None:
        return Path(security.node_key).name
    if settings.partition is not None:
        return "partition-" + settings.partition.split("/")[0]
    return Path(settings.data or "node").stem


def run_client(
    server: str,
    security: ClientSecurity,
    settings: NodeSettings,
    console: Console | None = None,
    register_wait: float = REGISTER_WAIT_SECONDS,
) -> int:
    """Run a SuperNode connected to ``server`` until it stops or we are interrupted; its exit code.

    A node the server refuses is retried for ``register_wait`` seconds from the first refusal
    before giving up (however long it waited for the server to come up before that).
    """
    console = console or Console()
    split_address(server, "--server")
    if not 0 <= register_wait < float("inf"):
        raise UserError(f"--register-wait must be a number of seconds >= 0, got {register_wait}")
    security.validate()
    name = node_name(security, settings)
    node_config = settings.node_config(name)
    state_dir = Path(str(node_config[keys.NODE_STATE_DIR]))
    if security.insecure:
        console.print("[bold red]WARNING: --insecure: this node's updates travel unencrypted and the server "
                      "is not authenticated. Use --root-cert outside a trusted test network.[/bold red]")
    # Flower's flower-supernode with a fix (supernode.py). --isolation process: it starts no
    # flower-superexec; we run a warm one (warm_executor.py).
    argv = [sys.executable, "-m", "fedweights.deploy.supernode", "--superlink", server, "--isolation", "process",
            "--node-config", " ".join(f"{k}={_value(v)}" for k, v in node_config.items())]
    if security.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(Path(security.root_cert).resolve())]
    if security.node_key is not None:
        argv += ["--auth-supernode-private-key", str(Path(security.node_key).resolve())]
    console.print(f"client {name}: SuperNode connecting to {server} (logs: {state_dir / 'logs'})")
    deadline = None  # counted from the first refusal: a node may wait long for the server to come up
    port_tries = 0
    with ProcessGroup(state_dir / "logs") as group:
        superexec = None
        while True:
            if superexec is None:  # free a moment ago: another process may bind it first (retried below)
                runtime_port = free_port()
                # it outlives SuperNode restarts (its imports take seconds) and ends with this process
                warm = warm_superexec_argv(runtime_port, os.getpid(), node_config.get(keys.NODE_DATA))
                superexec = group.start("superexec", warm)
            supernode = group.start("supernode", [*argv, "--port", str(runtime_port)])
            while supernode.poll() is None and superexec.poll() is None:
                time.sleep(0.2)
            if supernode.poll() is None:
                raise UserError(f"the ClientApp executor exited with code {superexec.returncode}:\n"
                                f"{group.log_tail('superexec', 40)}")
            code = supernode.returncode
            log = group.log_tail("supernode", 40)
            if code != 0 and RUNTIME_PORT_TAKEN.format(port=runtime_port) in log and port_tries < RUNTIME_PORT_TRIES:
                port_tries += 1  # its local Runtime API port was taken: both start again on another one
                group.stop("superexec")
                superexec = None
                continue
            refused = code == EXIT_AUTH_FAILED or "code: 2004" in log
            if refused and deadline is None:
                deadline = time.monotonic() + register_wait
            if not refused or time.monotonic() >= deadline:
                break
            # A server registers node keys just after its SuperLink starts: a node that was quicker retries.
            console.print("the server refused this node (key not registered yet?); retrying")
            time.sleep(2)
    if refused:
        pub = f"{security.node_key}.pub" if security.node_key else "this node's NAME.pub"
        raise NodeNotAuthorized(NOT_REGISTERED.format(pub=pub))
    if code != 0:
        raise UserError(f"the SuperNode exited with code {code}:\n{log}")
    return code


def warm_superexec_argv(runtime_port: int, parent_pid: int, node_data: str | None = None) -> list[str]:
    """The warm SuperExec for a SuperNode whose Runtime API listens on loopback ``runtime_port``;
    it ends with process ``parent_pid`` (``node_data``: the node's own data file, loaded once for all its tasks)."""
    argv = [sys.executable, "-m", "fedweights.deploy.warm_executor", "--runtime-api-address",
            f"127.0.0.1:{runtime_port}", "--insecure", "--parent-pid", str(parent_pid)]
    return argv + (["--node-data", str(node_data)] if node_data else [])


def _value(value: str | int) -> str:
    return str(value) if isinstance(value, int) else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
