"""Run the registry: a gRPC server over one store root (``fedweights registry serve``)."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from ..errors import UserError
from ..proto import registry_pb2_grpc as pb_grpc
from .auth import AccessPolicy, server_credentials
from .service import RegistryServicer
from .store import WeightStore

MESSAGE_LIMIT = 8 << 20
KEEPALIVE = [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 20_000)]
log = logging.getLogger("fedweights.registry")


@dataclass
class RunningRegistry:
    """A started registry server; ``address`` is HOST:PORT with the port actually bound."""

    server: grpc.Server
    address: str
    store: WeightStore
    _hold: contextlib.ExitStack

    def stop(self, grace: float | None = 2.0) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds) and release the root."""
        self.server.stop(grace).wait()
        self._hold.close()

    def __enter__(self) -> RunningRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_registry(
    root: str | Path,
    address: str = "127.0.0.1:0",
    policy: AccessPolicy = AccessPolicy(),
    tls_dir: str | Path | None = None,
    max_workers: int = 16,
) -> RunningRegistry:
    """Open (or create) the store at ``root`` and serve it on ``address`` (port 0: any free port)."""
    policy.validate()
    if policy.mtls and tls_dir is None:
        raise UserError("--mtls needs --tls-dir (with ca.crt, server.pem, server.key)")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:  # gRPC would quietly bind a random port for 99999
        raise UserError(f"invalid address {address!r}: use HOST:PORT with PORT 0..65535, e.g. 127.0.0.1:9600 or 0.0.0.0:9600")
    store = WeightStore(root)
    hold = contextlib.ExitStack()
    hold.enter_context(store.lock())
    try:
        server = grpc.server(
            ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="registry"),
            options=[("grpc.max_receive_message_length", MESSAGE_LIMIT), *KEEPALIVE],
        )
        pb_grpc.add_WeightRegistryServicer_to_server(RegistryServicer(store, policy), server)
        try:
            if tls_dir is not None:
                bound = server.add_secure_port(address, server_credentials(tls_dir, policy.mtls))
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if not bound:
            raise UserError(f"cannot listen on {address}: the port is in use or the host is not local")
        server.start()
    except BaseException:
        hold.close()
        raise
    return RunningRegistry(server, f"{host}:{bound}", store, hold)


def serve(root: str | Path, address: str, policy: AccessPolicy, tls_dir: str | Path | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then finish in-flight calls and exit."""
    registry = start_registry(root, address, policy, tls_dir)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    log.info(
        "serving weight registry %s on %s (%s; writes: %s; reads: %s)",
        Path(root).resolve(), registry.address, "TLS" if tls_dir else "plaintext",
        " or ".join(filter(None, ["token" if policy.token else "", "client certificate" if policy.mtls else ""])),
        "protected" if policy.protect_reads else "open",
    )  # fmt: skip
    stopping.wait()
    log.info("stopping")
    registry.stop(grace=5.0)


def spawn_registry(root: str | Path, *args: str, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """Start ``fedweights registry serve --root ROOT --address 127.0.0.1:0 ARGS`` as a process.

    Returns the process and the HOST:PORT it bound (read from its start-up log line).
    """
    cmd = [sys.executable, "-m", "fedweights", "registry", "serve", "--root", str(root), "--address", "127.0.0.1:0", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline, lines = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        found = re.search(r" on (127\.0\.0\.1:\d+) ", line)
        if found:
            return proc, found.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise UserError("the registry process did not start: " + "".join(lines)[-2000:])
