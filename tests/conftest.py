"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# rich sizes its consoles from COLUMNS when they are created (at import): keep CLI output unwrapped
# in every test process, xdist workers included, so assertions can look for whole lines.
os.environ["COLUMNS"] = "200"


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


@pytest.fixture
def cli_in_process(capfd, monkeypatch):
    """Run the `fedweights` entry point in this process (fast); returns (exit code, stdout, stderr).
    Captured at the file descriptors: `simulate` prints from the child process it supervises."""
    from fedweights.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.argv", ["fedweights", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        out, err = capfd.readouterr()
        return code, out, err

    return run


def _uses_ray(item: pytest.Item) -> bool:
    """Slow tests simulate federations on Ray, except deployment tests (real Flower processes)."""
    return item.get_closest_marker("slow") is not None and item.get_closest_marker("deploy") is None


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`) all Ray simulations go to one
    worker, in turn, sharing its Ray head; deployment and unit tests fill the other worker."""
    for item in items:
        if _uses_ray(item):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="session")
def shared_ray_cluster(tmp_path_factory):
    """One Ray head per test process, started by the first simulation test (see tests/ray_cluster.py)."""
    from .ray_cluster import RAY_ADDRESS_ENV, start_head, stop_head

    if os.environ.get(RAY_ADDRESS_ENV):
        yield os.environ[RAY_ADDRESS_ENV]
        return
    proc, address = start_head(tmp_path_factory.mktemp("ray"))
    os.environ[RAY_ADDRESS_ENV] = address
    try:
        yield address
    finally:
        os.environ.pop(RAY_ADDRESS_ENV, None)
        stop_head(proc)


@pytest.fixture(autouse=True)
def _ray_for_simulations(request):
    """Give every simulation test the shared Ray head (attaching takes ~1 s, a private start ~8-10 s)."""
    if _uses_ray(request.node):
        request.getfixturevalue("shared_ray_cluster")


@pytest.fixture
def serverapp_process(monkeypatch):
    """Act as a ServerApp process (Flower's task identity, one torch thread) for in-process federations."""
    import torch

    from .local_grid import act_as_serverapp_process

    threads = torch.get_num_threads()
    act_as_serverapp_process(monkeypatch.setattr)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def key_pairs(tmp_path_factory):
    """Two HE key pairs: the run's and a stranger's."""
    from fedweights.crypto.keys import make_keys

    root = tmp_path_factory.mktemp("keys")
    return make_keys(root / "run"), make_keys(root / "stranger")
