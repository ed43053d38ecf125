"""A run killed mid-way never stays "running": real `fedweights simulate` runs, real SIGKILLs.

* the process running the ServerApp (and Ray's driver) is killed: the surviving CLI marks the run
  failed, says so in one line, exits 1, leaves no process behind; `simulate --resume` continues;
* the whole process group is killed (nothing survives): `fedweights report` and the next run in
  the directory find the stale lock and mark the run interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedweights.deploy.processes import descendants

from .conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def _start(run_dir: Path, rounds: int = 500) -> subprocess.Popen:
    """``fedweights simulate`` in its own session, on the tests' shared Ray head."""
    env = {**os.environ, "COLUMNS": "200"}
    argv = [sys.executable, "-m", "fedweights", "simulate", "--clients", "2", "--rounds", str(rounds), "--out", str(run_dir)]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _wait_for_rounds(proc: subprocess.Popen, run_dir: Path, rounds: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if len(_metrics(run_dir)["rounds"]) >= rounds and (run_dir / "checkpoint" / "manifest.json").exists():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no round {rounds} within {timeout} s")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _serverapp_process(proc: subprocess.Popen) -> int:
    """The process running the simulation (ServerApp thread, Ray's driver): below the CLI if
    it supervises one, else the CLI itself."""
    runs = [p for p in descendants(proc.pid) if "fedweights simulate" in _cmdline(p)]
    return runs[0] if runs else proc.pid


def _session_processes(sid: int) -> list[str]:
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            left.append(f"{stat.parent.name}: {_cmdline(int(stat.parent.name))[:120]}")
    return left


def _assert_failed_clearly(proc: subprocess.Popen, run_dir: Path, cause: str) -> dict:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and cause in lines[0] and "resume" in lines[0], err[-3000:]
    metrics = _metrics(run_dir)
    assert metrics["status"] == "failed" and cause in metrics["error"], metrics.get("error")
    assert "the checkpoint of round" in metrics["error"]
    time.sleep(1)
    assert _session_processes(proc.pid) == [], "processes of the dead run outlived it"
    return metrics


def test_killed_serverapp_process_is_marked_failed_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    try:
        _wait_for_rounds(proc, run_dir, 2)
        os.kill(_serverapp_process(proc), signal.SIGKILL)
        metrics = _assert_failed_clearly(proc, run_dir, "killed by SIGKILL")
    finally:
        _kill_session(proc)
    done = json.loads((run_dir / "checkpoint" / "manifest.json").read_text())["round"]
    assert len(metrics["rounds"]) >= done
    resumed = run_cli("simulate", "--resume", str(run_dir), "--rounds", str(done + 1))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    metrics = _metrics(run_dir)
    assert metrics["status"] == "completed" and [r["round"] for r in metrics["rounds"]] == list(range(1, done + 2))
    assert metrics["resumes"][-1]["previous"]["status"] == "failed"


def test_a_run_killed_with_its_whole_process_group_reads_as_interrupted(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    try:
        _wait_for_rounds(proc, run_dir, 2)
        os.killpg(proc.pid, signal.SIGKILL)  # nothing of the run survives to record its end
        proc.communicate(timeout=60)
    finally:
        _kill_session(proc)
    assert _metrics(run_dir)["status"] == "running"  # what the dead run left
    report = run_cli("report", str(run_dir))  # not a DP run: no privacy report, but the status is told
    assert "run interrupted: the coordinator (pid" in " ".join(report.stdout.split()), report.stdout + report.stderr
    metrics = _metrics(run_dir)
    assert metrics["status"] == "interrupted"
    assert "stopped without recording the end of the run" in metrics["error"]
    assert "the checkpoint of round" in metrics["error"] and "--resume" in metrics["error"]


def _kill_session(proc: subprocess.Popen) -> None:
    """Leave nothing running whatever the test's outcome (the run has its own session)."""
    for pid in [proc.pid, *descendants(proc.pid), *(int(p.split(":")[0]) for p in _session_processes(proc.pid))]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if proc.poll() is None:
        proc.wait(timeout=30)
