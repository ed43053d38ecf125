"""A warm SuperExec for ``fedweights client``: each ClientApp task is a fork, not a fresh interpreter.

Flower's ``flower-superexec`` starts a new ``flwr-clientapp`` process per message, which pays for
interpreter start-up and importing flwr, torch and fedweights every time (seconds per task). This
process imports all of that once, then runs Flower's own SuperExec loop (``run_superexec``) with
``ForkExecutor``: ``launch`` forks a child that runs exactly what ``flwr-clientapp`` runs
(``run_clientapp`` with the task's token). The SuperNode runs with ``--isolation process`` and this
process connects to its Runtime API like ``flower-superexec`` would.

Forking is safe here because the parent never runs torch ops (so torch's intra-op pool does not
exist yet); its other threads are Flower's parent-pid watchdog (holds no locks) and the OpenBLAS
pools that NumPy/SciPy start at import, which OpenBLAS itself shuts down around ``fork``
(``pthread_atfork``) — the same state a ``multiprocessing`` fork of a NumPy program is in. Children are reaped on
every poll, inherit the same parent-pid watchdog as ``flwr-clientapp`` (they end when this process
ends), and are stopped (SIGTERM, then SIGKILL) when this process shuts down.

Run as ``python -m fedweights.deploy.warm_executor --runtime-api-address HOST:PORT --insecure
[--parent-pid PID]``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
import traceback
from logging import ERROR, INFO, WARNING

from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.exit.exit_handler import SIGNAL_TO_EXIT_CODE, registered_exit_handlers
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import run_clientapp

STOP_GRACE_SECONDS = 3.0
# The module, not the function of the same name that flwr.supercore.superexec may re-export.
superexec_loop = importlib.import_module("flwr.supercore.superexec.run_superexec")


class ForkExecutor(SubprocessExecutor):
    """Flower's subprocess executor, except that ClientApp tasks run in a fork of this process."""

    def __init__(self) -> None:
        self.children: dict[int, int] = {}  # pid -> task id

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork a child that runs the ClientApp task ``spec`` (other task types: as Flower does)."""
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as err:
            return LaunchResult.failed(f"fork failed: {err}")
        if pid == 0:  # the child: never returns
            _run_task(spec)
        self.children[pid] = spec.task_id
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (no zombies); log the ones that failed."""
        for pid, task_id in list(self.children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                del self.children[pid]
                code = os.waitstatus_to_exitcode(status)
                if code != 0:
                    log(WARNING, "ClientApp task %d (pid %d) exited with code %d", task_id, pid, code)

    def close(self) -> None:
        """Stop every running child: SIGTERM, then SIGKILL after a grace period; reap them all."""
        for pid in self.children:
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self.children and time.monotonic() < deadline:
            self.reconcile()
            time.sleep(0.05)
        for pid in self.children:
            _kill(pid, signal.SIGKILL)
        for pid in list(self.children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.children.clear()


def _run_task(spec: ExecutionSpec) -> None:
    """In the forked child: run the ClientApp task like ``flwr-clientapp`` would, then ``os._exit``."""
    code = 1
    try:
        # Forget the parent's shutdown machinery: its exit handlers would close its Runtime API
        # client and stop its other children; run_clientapp registers the child's own handlers.
        registered_exit_handlers.clear()
        for sig in SIGNAL_TO_EXIT_CODE:
            signal.signal(sig, signal.SIG_DFL)
        _reseed_numpy()
        if spec.suppress_output:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        code = 0
    except SystemExit as exit_:  # flwr_exit ends the task with sys.exit(code)
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - report anything, then leave the child
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _reseed_numpy() -> None:
    """A fresh interpreter seeds NumPy's global RNG from the OS; a fork would share the parent's state."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def preload(node_data: str | None = None) -> None:
    """Import what every ClientApp task needs, once (the point of this process), and read the
    node's data (its own file, else the built-in digits): every task is a fork and finds it loaded
    (``load_node_data``'s and ``load_digits_split``'s caches)."""
    import torch  # noqa: F401, PLC0415
    import torch._dynamo  # noqa: F401, PLC0415 - torch.optim imports it at the first optimizer (1.3-1.5 s a task)

    import fedweights.flower.client_app  # noqa: F401, PLC0415
    import fedweights.privacy.dp_sgd  # noqa: F401, PLC0415 - Opacus, which every DP task imports (0.3-0.4 s)

    if node_data:
        from fedweights.data.node_data import load_node_data  # noqa: PLC0415

        load_node_data(node_data)
    else:  # a --partition node trains on the built-in digits (scikit-learn import + load: 0.4 s a task)
        from fedweights.config import RunConfig  # noqa: PLC0415
        from fedweights.data.datasets import load_digits_split  # noqa: PLC0415

        load_digits_split(seed=RunConfig().seed)  # NumPy only, no torch op: cached for runs with that seed


def main(argv: list[str] | None = None) -> None:
    """Parse ``flower-superexec``-style arguments and run Flower's SuperExec loop with ForkExecutor."""
    parser = argparse.ArgumentParser(description="fedweights warm SuperExec (ClientApp tasks are forks)")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API HOST:PORT")
    parser.add_argument("--insecure", action="store_true", help="Runtime API without TLS (loopback)")
    parser.add_argument("--root-certificates", help="CA of the Runtime API's TLS certificate")
    parser.add_argument("--parent-pid", type=int, help="stop when this process (the SuperNode) ends")
    parser.add_argument("--node-data", help="the node's own .npz (fedweights client --data), read once here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    preload(args.node_data)
    log(INFO, "fedweights warm SuperExec ready (imports took %.1f s)", time.monotonic() - started)
    executor = ForkExecutor()
    # run_superexec picks its executor by type (subprocess/kubernetes); give it ours instead.
    superexec_loop.get_executor = lambda *_args, **_kwargs: executor
    try:
        superexec_loop.run_superexec(
            runtime_api_address=args.runtime_api_address,
            insecure=args.insecure,
            root_certificates_path=args.root_certificates,
            parent_pid=args.parent_pid,
            runtime_dependency_install=False,
        )
    except Exception:  # noqa: BLE001
        log(ERROR, "warm SuperExec failed", exc_info=True)
        executor.close()
        raise


if __name__ == "__main__":
    main()
