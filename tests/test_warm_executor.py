"""The warm SuperExec's ForkExecutor: ClientApp tasks are real forks running Flower's run_clientapp;
they are reaped (no zombies), end with their parent-pid watchdog, and close() stops them.

(The full path — a SuperNode with --isolation process feeding real tasks to the forks — runs in
test_deploy_e2e.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from fedweights.deploy.warm_executor import ForkExecutor

from .deploy_harness import free_port


def _spec(parent_pid: int) -> ExecutionSpec:
    # Nothing listens on this port: the task keeps retrying until it is stopped.
    return ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address=f"127.0.0.1:{free_port()}",
                         token="t0k3n", insecure=True, root_certificates_path=None, runtime_dependency_install=False,
                         parent_pid=parent_pid, suppress_output=True, task_id=7)


def _alive(pid: int) -> bool:
    """Running (not a zombie) according to /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _reaped_within(executor: ForkExecutor, pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        executor.reconcile()
        if pid not in executor.children:
            return not Path(f"/proc/{pid}").exists()
        time.sleep(0.1)
    return False


def test_a_task_is_a_fork_that_is_reaped_after_it_ends():
    executor = ForkExecutor()
    try:
        result = executor.launch(_spec(parent_pid=os.getpid()))
        assert result.status == LaunchResultStatus.ACCEPTED
        [pid] = executor.children
        assert _alive(pid)
        assert Path(f"/proc/{pid}/cmdline").read_bytes() == Path("/proc/self/cmdline").read_bytes()  # a fork
        # SIGKILL, not SIGTERM: with no SuperNode listening, Flower's graceful exit in the task waits
        # out its HTTP retry back-off (12 s steps, 35 s seen on a loaded CI machine). Reaping is what
        # is tested here; close() escalates SIGTERM to SIGKILL (next test).
        os.kill(pid, signal.SIGKILL)
        assert _reaped_within(executor, pid, 30), "the finished task was not reaped"
    finally:
        executor.close()


def test_tasks_end_with_their_parent_and_close_stops_the_rest():
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    executor = ForkExecutor()
    try:
        executor.launch(_spec(parent_pid=parent.pid))
        executor.launch(_spec(parent_pid=os.getpid()))
        watched, other = executor.children
        parent.kill()
        parent.wait()
        # Flower's watchdog ends the task gracefully (SIGINT): 5 s when idle, but its HTTP retry
        # back-off can hold the main thread for a few of its 20 s steps on a loaded machine.
        assert _reaped_within(executor, watched, 120), "a task outlived the process it watches"
        assert _alive(other)
        executor.close()
        assert executor.children == {} and not Path(f"/proc/{other}").exists()
    finally:
        parent.kill()
        executor.close()


def test_preload_leaves_tasks_nothing_to_import_or_load():
    """Each forked task imported Opacus and scikit-learn and re-read the digits itself (0.7 s of a
    DP task); the warm process now does it once, without running a torch op (fork safety)."""
    probe = ("import sys\nfrom fedweights.deploy.warm_executor import preload\npreload()\n"
             "from fedweights.config import RunConfig\nfrom fedweights.data.datasets import load_digits_split\n"
             "loaded = load_digits_split.cache_info().currsize\nload_digits_split(seed=RunConfig().seed)\n"
             "print(loaded, load_digits_split.cache_info().hits, [m for m in ('opacus', 'sklearn.datasets') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().split(maxsplit=2) == ["1", "1", "['opacus', 'sklearn.datasets']"]
