"""One coordinator per run directory: a second run (or resume) into a directory another live
process is running in fails at once and writes nothing; a crashed holder never blocks a resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedweights.config import RunConfig
from fedweights.flower.round_loop import run_federation
from fedweights.flower.runtime import Runtime
from fedweights.run_lock import HELD_ENV, RunDirInUse, RunLock

from .local_grid import LocalGrid, node_configs

HOLD = "import sys, time; from fedweights.run_lock import RunLock\nwith RunLock(sys.argv[1]):\n print('held', flush=True); time.sleep(120)"


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of tmp_path/run."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_coordinator_is_refused_and_writes_nothing(tmp_path, holder):
    run = tmp_path / "run"
    (run / "metrics.json").write_text('{"status": "running"}')
    config = RunConfig(clients=2, rounds=1, out=str(run), resume=True)
    with pytest.raises(RunDirInUse, match=rf"{run} is in use by another run \(pid {holder.pid} on .*\): wait for it"):
        run_federation(LocalGrid(Runtime(config), node_configs(2)), Runtime(config))
    assert (run / "metrics.json").read_text() == '{"status": "running"}'
    assert sorted(p.name for p in run.iterdir()) == [".lock", "metrics.json"]


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, holder):
    holder.kill()  # kill -9: no clean-up runs
    holder.wait()
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunDirInUse):  # held now by us, even against ourselves
            RunLock(tmp_path / "run").__enter__()


def test_a_child_of_the_holder_runs_under_the_handed_down_lock(tmp_path, monkeypatch):
    with RunLock(tmp_path / "run") as lock:
        monkeypatch.setenv(HELD_ENV, lock.hand_down()[HELD_ENV])  # what `fedweights server` gives its ServerApp
        with RunLock(tmp_path / "run"):
            pass
        monkeypatch.setenv(HELD_ENV, str(tmp_path / "other"))
        with pytest.raises(RunDirInUse):
            RunLock(tmp_path / "run").__enter__()


def test_simulate_into_a_directory_in_use_fails_before_it_writes_keys_or_starts_ray(tmp_path, holder):
    from fedweights.config import HEConfig
    from fedweights.flower.simulation import simulate

    config = RunConfig(clients=2, rounds=1, out=str(tmp_path / "run"), he=HEConfig(enabled=True))
    with pytest.raises(RunDirInUse, match=f"pid {holder.pid}"):
        simulate(config)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # no keys/, no task file


def test_a_run_refused_in_a_new_directory_leaves_no_directory(tmp_path, cli_in_process):
    """Settings only checked once the lock is held (HE strategy, unreachable target ε) used to leave
    RUN/ holding only .lock; an existing directory, and what it holds, stays."""
    code, _, err = cli_in_process("simulate", "--he", "--strategy", "median", "--clients", "2", "--rounds", "1",
                                  "--out", str(tmp_path / "new"))
    assert code == 2 and "not linear" in err
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    code, _, _ = cli_in_process("simulate", "--he", "--strategy", "median", "--clients", "2", "--rounds", "1",
                                "--out", str(tmp_path / "old"))
    assert code == 2 and (tmp_path / "old").is_dir()


def _running_run(run_dir, holder_pid=999999):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps({"run_id": "r", "status": "running", "config": {}, "rounds": []}))
    (run_dir / ".lock").write_text(json.dumps({"pid": holder_pid, "host": "h", "since": "t"}))
    (run_dir / "checkpoint").mkdir()
    (run_dir / "checkpoint" / "manifest.json").write_text(json.dumps({"round": 3}))


def test_a_run_left_running_by_a_dead_holder_is_marked_interrupted_by_the_next_lock(tmp_path):
    run_dir = tmp_path / "run"
    _running_run(run_dir)
    with RunLock(run_dir):
        metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    assert "coordinator (pid 999999 on h since t) stopped without recording" in metrics["error"]
    assert "checkpoint of round 3 is kept" in metrics["error"]


def test_settle_leaves_a_live_run_alone(tmp_path, holder):
    from fedweights.run_lock import settle

    run_dir = tmp_path / "run"
    (run_dir / "metrics.json").write_text(json.dumps({"run_id": "r", "status": "running", "config": {}, "rounds": []}))
    settle(run_dir)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "running"
