"""``fedweights simulate`` as a small parent watching the process that runs the simulation.

The ServerApp runs inside the simulating process (a thread next to Ray's driver). If that
process is killed (SIGKILL, the OOM killer) or Ray takes it down (Ray ends a driver whose GCS or
raylet died), nothing in it can record the end of the run. So the CLI runs the simulation in a
child process and, when the child ends without recording it, marks the run ``failed`` with what
died and what the checkpoint allows, prints one line, exits non-zero, and stops every process
the child left behind (this process is their subreaper, so Ray's orphans come back to it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..config import RunConfig
from ..deploy.processes import PR_SET_CHILD_SUBREAPER, descendants, dies_with_us, prctl
from ..run_lock import RunLock
from ..run_status import FAILED, mark_ended, resume_hint

CONFIG_ENV = "FEDWEIGHTS_SIMULATE_CONFIG"  # set in the child: the run config (JSON) it runs
GRACE_SECONDS = 3.0  # leftovers: SIGTERM, then SIGKILL
STOP_GRACE_SECONDS = 5.0  # after Ctrl-C, how long the child may take to end by itself


class Outcome:
    """How a supervised simulation ended: the exit code to use and the line to print (if any)."""

    def __init__(self, code: int, message: str | None = None) -> None:
        self.code, self.message = code, message


def child_config() -> RunConfig | None:
    """In the supervised child: the run config its parent passed down (None elsewhere)."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        return None
    from ..config import from_dict

    return from_dict(json.loads(raw))


def child_signals() -> None:
    """In the child: SIGTERM (the parent's death) ends the run like Ctrl-C, once."""
    def stop(signum, _frame) -> None:
        signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the run's cleanup short
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)


def supervise(config: RunConfig, verbose: bool) -> Outcome:
    """Run ``config`` in a child ``fedweights simulate`` while holding the run directory's lock,
    and judge how the child ended. The child makes every check a run makes (refusals print from
    it, before Ray starts); this parent stays light (no torch, no registry)."""
    config.validate()
    out = Path(config.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    config = dataclasses.replace(config, out=str(out))
    with RunLock(out) as lock:  # held until the run's end is recorded, whoever records it
        metrics = out / "metrics.json"
        before = metrics.stat().st_mtime_ns if metrics.exists() else 0
        code, pid, stopped = _run_child(config, verbose, lock.hand_down())
        if code == 0:
            return Outcome(0)
        lock.discard_if_unused()  # a run the child refused before writing anything leaves no directory
        what = f"stopped by {'Ctrl-C' if stopped == 'SIGINT' else stopped}" if stopped else _what_died(pid, code)
        marked = mark_ended(out, FAILED, f"{what}; {resume_hint(out)}", since_ns=before)
    if stopped:
        return Outcome(130 if stopped == "SIGINT" else 143, f"{what}; {resume_hint(out)}")
    if marked is not None:
        return Outcome(1, f"run failed: {what}; {resume_hint(out)}")
    if code < 0:  # killed before the run started (or after it recorded its end)
        return Outcome(1, what)
    return Outcome(code)  # the child ended the run itself and printed why


def _run_child(config: RunConfig, verbose: bool, env: dict[str, str]) -> tuple[int, int, str | None]:
    """Run the simulation in a child process; (its exit code, its pid, the signal that stopped
    us, if any) once it and all it left are gone."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)  # Ray's processes the child leaves come back to us, to be stopped
    before = set(descendants(os.getpid()))  # not ours to stop (e.g. a test's own processes)
    env = {**os.environ, **env, CONFIG_ENV: json.dumps(dataclasses.asdict(config))}
    argv = [sys.executable, "-m", "fedweights", "simulate", *(["--verbose"] if verbose else [])]
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                             preexec_fn=dies_with_us())
    stop: dict[str, float] = {}
    for sig in old:  # recorded here, acted on below
        signal.signal(sig, lambda signum, _f: stop.setdefault(signal.Signals(signum).name, time.monotonic()))
    try:
        while (code := _wait(child, 0.2)) is None:
            # SIGTERM: end the child now (Ray's driver would abort on it). Ctrl-C: the terminal sent
            # the child SIGINT too; it ends itself unless its ServerApp thread waits for replies.
            if "SIGTERM" in stop or ("SIGINT" in stop and time.monotonic() - stop["SIGINT"] > STOP_GRACE_SECONDS):
                child.kill()  # safe: every completed round is checkpointed, the ledger kept
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _stop_leftovers(before)
    return code, child.pid, next(iter(stop), None)


def _wait(child: subprocess.Popen, seconds: float) -> int | None:
    try:
        return child.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def _what_died(pid: int, code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        why = " (kill -9 or the out-of-memory killer)" if name == "SIGKILL" else ""
        return f"the simulation process (pid {pid}: the ServerApp and Ray's driver) was killed by {name}{why}"
    return (f"the simulation process (pid {pid}) exited with code {code} without recording the end of the run "
            "(Ray ends its driver when Ray's own processes die)")


def _stop_leftovers(keep: set[int]) -> None:
    """SIGTERM what the child left (Ray's processes), SIGKILL it after a grace period, reap it."""
    left = set(descendants(os.getpid())) - keep
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (GRACE_SECONDS if sig == signal.SIGTERM else 1.0)
        while left and time.monotonic() < deadline:
            _reap(left)
            left = set(descendants(os.getpid())) - keep
            time.sleep(0.05)
        if not left:
            return


def _reap(pids: set[int]) -> None:
    """Collect those of ``pids`` that exited and were reparented to us (zombies otherwise)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (still below another process) or already reaped
            pass
