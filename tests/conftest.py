"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `fedweights` CLI in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "fedweights", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@pytest.fixture
def cli():
    """The `run_cli` helper as a fixture."""
    return run_cli


@pytest.fixture(scope="session", autouse=True)
def shared_ray_cluster(request, tmp_path_factory):
    """Slow tests simulate many federations: let them share one Ray head (see tests/ray_cluster.py)."""
    from .ray_cluster import RAY_ADDRESS_ENV, start_head, stop_head

    wants_ray = any(item.get_closest_marker("slow") for item in request.session.items)
    if not wants_ray or os.environ.get(RAY_ADDRESS_ENV):
        yield None
        return
    proc, address = start_head(tmp_path_factory.mktemp("ray"))
    os.environ[RAY_ADDRESS_ENV] = address
    try:
        yield address
    finally:
        os.environ.pop(RAY_ADDRESS_ENV, None)
        stop_head(proc)
