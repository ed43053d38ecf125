"""A throwaway Flower federation on loopback: one SuperLink and N SuperNodes as real processes.

Each process runs in its own process group on free ports, with a private ``FLWR_HOME`` whose
``config.toml`` names the SuperLink as a federation, so ``flwr run APP NAME`` submits to it.
Used by the round benchmark; everything is torn down (SIGTERM, then SIGKILL) on exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..deploy.federation import FEDERATION, write_flwr_home
from ..deploy.processes import flower_executable, free_port, wait_healthy
from ..errors import UserError

__all__ = ["FEDERATION", "LocalFederation", "free_port"]

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
                [flower_executable("flower-superlink"), "--insecure", "--port", str(self.superlink_port),
                 "--disable-runtime-dependency-installation"],
            )
            wait_healthy(f"http://127.0.0.1:{self.superlink_port}/health", link, "flower-superlink")
            for i in range(self.nodes):
                port = free_port()
                node = self._start(
                    f"supernode-{i}",
                    [flower_executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.superlink_port}",
                     "--port", str(port), "--node-config", f"partition-id={i} num-partitions={self.nodes}"],
                )
                wait_healthy(f"http://127.0.0.1:{port}/health", node, f"flower-supernode {i}")
        except BaseException:
            self.close()
            raise
        write_flwr_home(self.home, f"127.0.0.1:{self.superlink_port}", None)
        return self

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.processes.append((name, process))
        return process

    def run_app(self, app_dir: Path, timeout: float = 900, run_config: str | None = None) -> tuple[float, str]:
        """``flwr run APP_DIR --stream`` on this federation; returns (wall seconds, its output)."""
        argv = [flower_executable("flwr"), "run", str(app_dir), FEDERATION, "--stream"]
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
