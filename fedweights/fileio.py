"""Crash-safe file writes: write a temporary sibling, fsync, then rename over the target."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never a torn one."""
    with atomic_open(path, mode) as fh:
        fh.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Write ``path`` through a temporary sibling that replaces it only if the block succeeds.

    If the block raises (e.g. a check of what was written fails), ``path`` is left untouched and
    the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
