"""One coordinator per run directory: an exclusive lock while a run writes there.

Two coordinators writing one run directory (a second ``server --resume`` while the first still
runs, two runs given the same ``--out``) would interleave their ledger, metrics and checkpoints.
``RunLock`` takes ``fcntl.flock`` on ``RUN/.lock``: the kernel drops it when the holder exits or
dies (kill -9 included), so resuming after a crash is never blocked by a stale lock; whoever takes
it next marks a run its dead holder left ``running`` as ``interrupted`` (``run_status``). A
coordinator whose run continues elsewhere (``fedweights server``'s ServerApp process, ``simulate``'s
in-process ServerApp) hands the lock down through ``HELD_ENV``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError
from .run_status import settle_stale_run

LOCK_FILE = ".lock"
HELD_ENV = "FEDWEIGHTS_RUN_LOCK_HELD"  # a run directory whose lock a parent process holds


class RunDirInUse(UserError):
    """Another live process is running in this run directory."""


class RunLock:
    """``with RunLock(run_dir):`` — hold the run directory's lock, or raise ``RunDirInUse``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> RunLock:
        if os.environ.get(HELD_ENV) == str(self.run_dir):
            return self  # our parent coordinator holds it for us
        self._created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirInUse(
                f"run directory {self.run_dir} is in use by another run ({holder}): wait for it to end or "
                "stop it, then resume; or give this run another --out"
            ) from None
        settle_stale_run(self.run_dir, _read_holder(fd))  # its holder died without recording the run's end
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if self._fd is None:
            return
        if exc_type is not None:
            self.discard_if_unused()
        os.close(self._fd)  # closing the descriptor releases the lock; the file stays (no unlink race)
        self._fd = None

    def discard_if_unused(self) -> None:
        """Remove the run directory if we made it, moments ago, and it holds only the lock (a run
        refused before it wrote anything leaves nothing behind)."""
        if self._fd is not None and self._created and self.run_dir.is_dir() and \
                [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            (self.run_dir / LOCK_FILE).unlink()
            self.run_dir.rmdir()

    @contextmanager
    def shared_in_process(self) -> Iterator[None]:
        """Let a run in this process (``simulate``'s in-process ServerApp) use the lock we hold."""
        previous = os.environ.get(HELD_ENV)
        os.environ[HELD_ENV] = str(self.run_dir)
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(HELD_ENV, None)
            else:
                os.environ[HELD_ENV] = previous

    def hand_down(self) -> dict[str, str]:
        """Environment for a child process that runs this run while we hold the lock."""
        return {HELD_ENV: str(self.run_dir)}


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def settle(run_dir: str | Path) -> None:
    """If no coordinator holds ``run_dir`` now, mark a run it left ``running`` as ``interrupted``
    (for readers such as ``fedweights report``); a live run is left alone."""
    if not (Path(run_dir) / LOCK_FILE).exists():
        return
    try:
        with RunLock(run_dir):
            pass
    except (RunDirInUse, OSError):  # live, or a copy we may not write to: leave it as it is
        pass
