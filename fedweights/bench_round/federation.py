"""A throwaway Flower federation on loopback: one SuperLink and N SuperNodes as real processes.

Each process runs in its own process group on free ports, with a private ``FLWR_HOME`` whose
``config.toml`` names the SuperLink as a federation, so ``flwr run APP NAME`` submits to it.
Used by the round benchmark; everything is torn down (SIGTERM, then SIGKILL) on exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

FEDERATION = "bench"


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(port: int, process: subprocess.Popen, name: str, timeout: float = 60) -> None:
    """Poll ``http://127.0.0.1:port/health`` until it answers 200; fail if the process dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"{name} exited with code {process.returncode} before it became healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise UserError(f"{name} did not answer /health on port {port} within {timeout:.0f} s")


@dataclass
class LocalFederation:
    """``with LocalFederation(workdir, nodes=2) as fed: fed.run_app(app_dir)``."""

    workdir: Path
    nodes: int = 2
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    superlink_port: int = 0

    def __enter__(self) -> LocalFederation:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(exist_ok=True)
        bin_dir = str(Path(sys.executable).parent)  # flwr-serverapp / flwr-clientapp from this environment
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
        try:
            self.superlink_port = free_port()
            link = self._start(
                "superlink",
                [f"{bin_dir}/flower-superlink", "--insecure", "--port", str(self.superlink_port),
                 "--disable-runtime-dependency-installation"],
            )
            wait_healthy(self.superlink_port, link, "flower-superlink")
            for i in range(self.nodes):
                port = free_port()
                node = self._start(
                    f"supernode-{i}",
                    [f"{bin_dir}/flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.superlink_port}",
                     "--port", str(port), "--node-config", f"partition-id={i} num-partitions={self.nodes}"],
                )
                wait_healthy(port, node, f"flower-supernode {i}")
        except BaseException:
            self.close()
            raise
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n'
            f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{self.superlink_port}"\ninsecure = true\n'
        )
        return self

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.processes.append((name, process))
        return process

    def run_app(self, app_dir: Path, timeout: float = 900, run_config: str | None = None) -> tuple[float, str]:
        """``flwr run APP_DIR --stream`` on this federation; returns (wall seconds, its output)."""
        argv = [str(Path(sys.executable).parent / "flwr"), "run", str(app_dir), FEDERATION, "--stream"]
        if run_config:
            argv += ["--run-config", run_config]
        started = time.monotonic()
        result = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout, cwd=self.workdir)
        wall = time.monotonic() - started
        if result.returncode != 0:
            raise UserError(f"`flwr run {app_dir}` failed ({result.returncode}): {(result.stderr or result.stdout)[-2000:]}")
        return wall, result.stdout + result.stderr

    def close(self) -> None:
        """Stop every process group this federation started."""
        for _, process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for _, process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()

    def __exit__(self, *exc) -> None:
        self.close()
