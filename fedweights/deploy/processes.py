"""Child processes of ``fedweights server``/``client``: readiness by polling ``GET /health``,
and shutdown that leaves no orphans.

Children stay in our process group, so Ctrl-C in a terminal or ``kill -9 -PGID`` reaches all of
them at once. ``ProcessGroup`` owns them; used as a context manager it turns SIGINT/SIGTERM into
``KeyboardInterrupt`` and on exit stops every child and everything it started (SIGTERM, then
SIGKILL after a grace period). On Linux a child also gets SIGTERM when we die without cleaning up
(``kill -9 PID``, the OOM killer): a crashed server leaves no SuperLink holding its port and its
run directory (Flower's own processes below it follow their parents).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..errors import UserError

GRACE_SECONDS = 5.0
# Flower's SuperExec polls for new tasks every second by default; ours poll faster (fewer idle seconds per round).
FAST_POLL_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1", "FLWR_TELEMETRY_ENABLED": "0"}
# torch's OpenMP threads spin while they wait for work. Several torch processes sharing cores (a
# server and its clients, or nodes on one workstation) then starve each other: 45 steps of the
# default MLP took 0.02 s in one process and 2.8 s in each of two forked tasks on 2 cores (0.09 s
# with passive waiting). The user's own OMP_WAIT_POLICY wins.
THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def flower_executable(name: str) -> str:
    """Path of a Flower console script (``flower-superlink`` …) installed next to this Python."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise UserError(f"{name} not found: is flwr installed in this environment? (pip install 'flwr>=1.42,<1.43')")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def split_address(address: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port), or a UserError naming ``option``."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{option} must look like HOST:PORT (e.g. 0.0.0.0:9092), got {address!r}")
    return host, int(port)


class ProcessGroup:
    """Children started with ``start``; all of them are stopped on ``close`` (or leaving ``with``)."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**THREAD_ENV, **os.environ, **FAST_POLL_ENV, **(env or {})}
        # Flower's processes start further Flower scripts by name (flower-superexec, flwr-clientapp …):
        # find those next to this Python even when its environment is not activated.
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])
        self.children: dict[str, subprocess.Popen] = {}
        self._log_offsets: dict[str, int] = {}  # where each child's output starts in its (appended) log
        self._old_handlers: dict[int, object] = {}

    def start(self, name: str, argv: list[str], stdout=None) -> subprocess.Popen:
        """Start ``argv``; its output goes to ``LOG_DIR/NAME.log`` (stdout to ``stdout`` if given)."""
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self._log_offsets[name] = log.seek(0, os.SEEK_END)
        proc = subprocess.Popen(
            argv, env=self.env, stdout=stdout or log, stderr=subprocess.STDOUT if stdout is None else log,
            stdin=subprocess.DEVNULL, preexec_fn=dies_with_us(),
        )
        proc._fedweights_log = log  # type: ignore[attr-defined]
        self.children[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        """The last lines the child last started as ``name`` wrote (not earlier runs in its log file)."""
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        with path.open("rb") as log:
            log.seek(self._log_offsets.get(name, 0))
            text = log.read().decode(errors="replace")
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, name: str) -> None:
        """Stop the child started as ``name`` (and its descendants), like ``close`` stops them all."""
        _stop([self.children.pop(name)])

    def close(self) -> None:
        """SIGTERM each child and its descendants, wait up to GRACE_SECONDS, then SIGKILL what is left."""
        _stop(list(self.children.values()))
        self.children.clear()

    def __enter__(self) -> ProcessGroup:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, _interrupt)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)


def _stop(procs: list[subprocess.Popen]) -> None:
    family = {pid for proc in procs for pid in [proc.pid, *descendants(proc.pid)]}
    for pid in family:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for pid in family | {pid for proc in procs for pid in descendants(proc.pid)}:
        _signal(pid, signal.SIGKILL)  # stragglers; a no-op for processes already gone
    for proc in procs:
        proc.wait()
        proc._fedweights_log.close()  # type: ignore[attr-defined]


def wait_healthy(url: str, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    """Poll ``url`` (``…/health``) until it answers 200; fail early if ``proc`` exits."""
    # Readiness only: the certificate is checked by Flower's own clients, which use the CA.
    context = ssl._create_unverified_context() if url.startswith("https") else None  # noqa: S323
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{what} exited with code {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:  # noqa: S310 - our own child
                if response.status == 200:
                    return
        except OSError:  # URLError included
            pass
        time.sleep(0.1)
    raise UserError(f"{what} did not become ready at {url} within {timeout:.0f} s")


PR_SET_PDEATHSIG = 1  # linux/prctl.h
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, value: int) -> bool:
    """Linux ``prctl(option, value)`` for this process; False where it is not available."""
    if sys.platform != "linux":
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value) == 0
    except (OSError, AttributeError):
        return False


def dies_with_us():
    """A ``preexec_fn`` (None off Linux): the child gets SIGTERM when the process starting it dies."""
    if sys.platform != "linux":
        return None
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGTERM) and os.getppid() != parent:
            os._exit(1)  # the parent died before the prctl: nobody will signal us

    return preexec


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def descendants(pid: int) -> list[int]:
    """Process ids of everything ``pid`` started, transitively (from ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
