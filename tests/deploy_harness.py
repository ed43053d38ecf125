"""Starts `fedweights server` and `fedweights client` processes for the deployment tests.

Every process runs in its own session so a test can signal (or kill -9) its whole process group,
the way a terminal or a crash would. ``close()`` kills what is left and checks nothing survived.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedweights.flower.checkpoint import MANIFEST_FILE, checkpoint_dir

from .conftest import REPO, run_cli


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Deployment:
    """Keys, a server and clients under ``tmp``; ``prefix`` runs each process through e.g. ``ip netns exec``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def make_keys(self, nodes: list[str], authorized: list[str], hosts: list[str] = ()) -> None:
        """``fedweights keys tls`` and one ``keys node`` per node, run side by side (each CLI process
        spends its ~3 s importing); the authorized nodes' public keys go to ``authorized/``."""
        host_args = [a for h in hosts for a in ("--host", h)]
        commands = [("keys", "tls", "--out", str(self.tmp / "tls"), *host_args)]
        commands += [("keys", "node", "--out", str(self.tmp / "nodes"), "--name", name) for name in nodes]
        with ThreadPoolExecutor(len(commands)) as pool:
            for result in pool.map(lambda args: run_cli(*args), commands):
                assert result.returncode == 0, result.stderr
        (self.tmp / "authorized").mkdir()
        for name in authorized:
            (self.tmp / "authorized" / f"{name}.pub").write_bytes((self.tmp / "nodes" / f"{name}.pub").read_bytes())

    def start(self, name: str, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "fedweights", *args], stdout=out, stderr=subprocess.STDOUT,
                cwd=REPO, env={**os.environ, "COLUMNS": "200"}, start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def server(self, address: str, *args: str, name: str = "server", prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        return self.start(name, "server", "--address", address, "--tls-dir", str(self.tmp / "tls"),
                          "--authorized-nodes", str(self.tmp / "authorized"), *args, prefix=prefix)

    def client(self, node: str, server: str, partition: str | None, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        """A client on ``partition`` of the built-in data (None: ``args`` say ``--data FILE``)."""
        data = ["--partition", partition] if partition else []
        return self.start(node, "client", "--server", server, "--root-cert", str(self.tmp / "tls" / "ca.crt"),
                          "--node-key", str(self.tmp / "nodes" / node), *data,
                          "--state-dir", str(self.tmp / "state" / node), *args, prefix=prefix)

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace") if name in self.logs else ""

    def all_logs(self) -> str:
        return "\n".join(f"----- {n} -----\n{self.log(n)[-3000:]}" for n in self.logs)

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout} s\n{self.all_logs()}") from None

    def wait_for_round(self, run_dir: Path, round_: int, timeout: float, server: str = "server") -> None:
        """Until round ``round_`` (or a later one) of the run in ``run_dir`` is complete."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[server].poll() is not None:
                raise AssertionError(f"{server} exited ({self.procs[server].returncode}) before round {round_}\n{self.all_logs()}")
            # complete = recorded in metrics.json and checkpointed (written just after): a crash in between
            # resumes from the round before, and the tests kill right after this returns
            if _recorded(run_dir / "metrics.json", round_) and _checkpointed(run_dir, round_):
                return
            time.sleep(0.5)
        raise AssertionError(f"round {round_} not in {run_dir}/metrics.json after {timeout} s\n{self.all_logs()}")

    def signal_group(self, name: str, sig: int) -> None:
        try:
            os.killpg(self.procs[name].pid, sig)
        except ProcessLookupError:
            pass

    def survivors(self) -> list[str]:
        """Command lines of live processes that mention this test's directory or run in a session it
        started (the warm SuperExec and its forked tasks name no path of the test)."""
        sessions = {str(proc.pid) for proc in self.procs.values()}
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state, _ppid, _pgrp, session = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            except (OSError, ValueError):
                continue
            if state != "Z" and (str(self.tmp) in text or session in sessions):
                found.append(text[:200])
        return found

    def close(self) -> None:
        for name in self.procs:
            self.signal_group(name, signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait()


def _recorded(metrics: Path, round_: int) -> bool:
    try:
        return any(r["round"] >= round_ for r in json.loads(metrics.read_text()).get("rounds", []))
    except (OSError, ValueError):
        return False


def _checkpointed(run_dir: Path, round_: int) -> bool:
    try:
        return json.loads((checkpoint_dir(run_dir) / MANIFEST_FILE).read_text())["round"] >= round_
    except (OSError, ValueError, KeyError):
        return False
