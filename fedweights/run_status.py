"""A run's end when its coordinator could not record it (killed, OOM, Ray gone).

A coordinator writes ``status: "running"`` and, on any exit it sees, ``completed`` or ``failed``.
A SIGKILL leaves ``running`` behind. Whoever survives the coordinator (``fedweights simulate``'s
supervising parent, ``fedweights server``) marks the run ``failed``; when nothing survived, the
next process that takes the run directory's lock, or reads it while the lock is free (``report``),
finds ``running`` with nobody holding the lock and marks it ``interrupted``. Both keep the
checkpoint of the last completed round, and say so in ``error``. Imports nothing heavy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .fileio import atomic_write_json

RUNNING, FAILED, INTERRUPTED = "running", "failed", "interrupted"
METRICS_FILE = "metrics.json"
MANIFEST = Path("checkpoint") / "manifest.json"


def checkpoint_round(run_dir: str | Path) -> int | None:
    """The round of the run's last checkpoint (None: no readable checkpoint)."""
    try:
        value = json.loads((Path(run_dir) / MANIFEST).read_text()).get("round")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def resume_hint(run_dir: str | Path, how: str = "") -> str:
    """What the run's checkpoint allows: resume after round K, or start again."""
    done = checkpoint_round(run_dir)
    if not done:
        return "no round completed, so there is no checkpoint to resume from: start the run again"
    how = how or f"`fedweights simulate --resume {run_dir}` (a deployment: `fedweights server --resume {run_dir}`)"
    return f"the checkpoint of round {done} is kept: resume with {how}"


def mark_ended(run_dir: str | Path, status: str, error: str, since_ns: int | None = None) -> dict[str, Any] | None:
    """Set ``status``/``error`` in metrics.json if it still says ``running`` (and, with ``since_ns``,
    was written after that time: a run older than ours is not ours to judge). Returns the new
    metrics, or None when nothing was changed. Call it holding the run directory's lock."""
    data = running_metrics(run_dir, since_ns)
    if data is None:
        return None
    data.update(status=status, error=error)
    atomic_write_json(Path(run_dir) / METRICS_FILE, data)
    return data


def running_metrics(run_dir: str | Path, since_ns: int | None = None) -> dict[str, Any] | None:
    """metrics.json if it says ``running`` (and, with ``since_ns``, was written after that time),
    else None."""
    path = Path(run_dir) / METRICS_FILE
    try:
        if since_ns is not None and path.stat().st_mtime_ns <= since_ns:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("status") == RUNNING else None


def interrupted_error(run_dir: str | Path, holder: str) -> str:
    """``error`` of a run whose coordinator vanished without a word."""
    return (f"the coordinator ({holder}) stopped without recording the end of the run "
            f"(killed, e.g. kill -9 or the OOM killer, or its machine went down); {resume_hint(run_dir)}")


def settle_stale_run(run_dir: str | Path, holder: str) -> bool:
    """Mark a run ``interrupted`` if metrics.json says ``running`` although we now hold its lock
    (its coordinator, ``holder``, is gone). True when it did."""
    return mark_ended(run_dir, INTERRUPTED, interrupted_error(run_dir, holder)) is not None
