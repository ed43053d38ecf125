"""One Ray head for the whole test session, so each simulated federation attaches (~1 s)
instead of starting its own Ray instance (~8-10 s). Set FEDWEIGHTS_RAY_ADDRESS yourself to
use another cluster; tests that check the default path unset it for their run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedweights.flower.simulation import RAY_ADDRESS_ENV


# One CPU: each simulation gets one client actor (its clients train in turn). The suite's two xdist
# workers share 2 cores, and a second actor mostly adds a second interpreter importing torch: the HE
# simulate test (two runs at once) took 48.9 s with 1, 63.5 s with 2; the 10-client median test 30.1 s
# vs 29.4 s. The product's own default (a private Ray start, one CPU per actor) keeps its tests.
HEAD_CPUS = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_head(log_dir: Path) -> tuple[subprocess.Popen, str]:
    """Start a blocking `ray start --head` in its own process group; return it and its address."""
    port = free_port()
    ray = Path(sys.executable).parent / "ray"
    log = open(log_dir / "ray-head.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [str(ray), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--num-cpus={HEAD_CPUS}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start failed; see {log_dir / 'ray-head.log'}")
        # the GCS port opens seconds before the raylet is up: a driver attaching then is ended by Ray
        if "Ray runtime started" in (log_dir / "ray-head.log").read_text(errors="replace"):
            return proc, f"127.0.0.1:{port}"
        time.sleep(0.2)
    stop_head(proc)
    raise RuntimeError(f"ray head did not start within 60 s; see {log_dir / 'ray-head.log'}")


def stop_head(proc: subprocess.Popen) -> None:
    """Stop the head (SIGINT: `ray start --block` then shuts its cluster down), then make sure
    nothing of its process group is left."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=5)


__all__ = ["RAY_ADDRESS_ENV", "start_head", "stop_head"]
