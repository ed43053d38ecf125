"""Notice a ServerApp that died mid-run under ``fedweights server``.

The SuperLink runs the ServerApp as a ``flwr-serverapp`` process below it. Killed (SIGKILL, the
OOM killer), it records nothing: Flower notices only after two missed heartbeats (about a minute)
and metrics.json would stay ``running``. ``ServerAppWatch`` polls for that process; once it is gone
while metrics.json (rewritten by this run) still says ``running``, it stops ``flwr run`` so the
server can mark the run failed at once.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from ..run_status import running_metrics
from .processes import descendants

POLL_SECONDS = 0.5


class ServerAppWatch:
    """``with ServerAppWatch(superlink, metrics, since_ns, stream):`` — ``died`` names the pid of a
    ServerApp that vanished mid-run (None otherwise); ``stream`` (``flwr run``) is stopped then."""

    def __init__(self, superlink: subprocess.Popen, metrics: Path, since_ns: int | None, stream: subprocess.Popen) -> None:
        self.superlink, self.metrics, self.since_ns, self.stream = superlink, metrics, since_ns, stream
        self.died: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="serverapp-watch", daemon=True)

    def __enter__(self) -> ServerAppWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        seen: set[int] = set()
        while not self._stop.wait(POLL_SECONDS) and self.stream.poll() is None:
            alive = {pid for pid in descendants(self.superlink.pid) if _is_serverapp(pid)}
            gone = seen - alive
            seen |= alive
            if gone and not alive and self._still_running():
                self.died = min(gone)
                self.stream.terminate()  # `flwr run --stream` would wait for Flower's heartbeat timeout
                return

    def _still_running(self) -> bool:
        """metrics.json was written by this run and still says ``running``."""
        return running_metrics(self.metrics.parent, self.since_ns) is not None


def _is_serverapp(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name == "flwr-serverapp" for arg in argv[:2])
