"""Dropouts: dead or failing clients never hang a run; failed rounds stop it (resumable) or are retried.

Real round loop, Flower strategies and ClientApp code on ``FaultyGrid`` (nodes in this process that
crash, die mid-round or never connect, as a test asks)."""

from __future__ import annotations

import time

import pytest

from fedweights.config import RunConfig
from fedweights.errors import RunFailed
from fedweights.flower.checkpoint import load_checkpoint, resume_config
from fedweights.flower.round_loop import run_federation
from fedweights.flower.runtime import Runtime
from fedweights.progress import RichReporter
from fedweights.run_dir import RunDir

from .local_grid import FaultyGrid, node_configs


pytestmark = pytest.mark.usefixtures("serverapp_process")


def federate(config: RunConfig, nodes: int, **faults) -> RunDir:
    grid = FaultyGrid(Runtime(config), node_configs(nodes), **faults)
    run_federation(grid, Runtime(config), reporter=RichReporter())
    return RunDir(config.out)


def test_a_client_dying_mid_round_does_not_hang_the_run(tmp_path):
    config = RunConfig(clients=3, rounds=3, min_clients=2, round_timeout=5, out=str(tmp_path / "run"))
    run_dir = federate(config, nodes=3, die_in_round={3: 2})
    rounds = run_dir.read_metrics()["rounds"]
    assert [r["num_clients"] for r in rounds] == [3, 2, 2]  # round 2 completes with the replies received
    assert rounds[1]["failures"] == [{"node": "3", "reason": "no reply within round_timeout"}]
    assert run_dir.read_metrics()["status"] == "completed"


def test_too_few_connected_nodes_fail_the_round_within_the_timeout_and_retry_first(tmp_path):
    """Three clients configured, two ever connect: Flower alone would wait for the third forever."""
    config = RunConfig(clients=3, rounds=2, round_timeout=1, on_round_timeout="retry", round_retries=1, out=str(tmp_path / "run"))
    started = time.monotonic()
    with pytest.raises(RunFailed, match=r"round 1: only 2 node\(s\) connected, 3 needed.*\(attempt 2 of 2\)") as info:
        federate(config, nodes=2)
    assert time.monotonic() - started < 30  # bounded: two attempts of about round_timeout (1 s polls)
    assert "no round completed" in str(info.value)
    assert "resume the run" not in str(info.value) and "start the run again" in str(info.value)  # no checkpoint
    metrics = RunDir(config.out).read_metrics()
    assert metrics["status"] == "failed" and "3 needed" in metrics["error"]
    assert [(a["round"], a["attempt"]) for a in metrics["failed_attempts"]] == [(1, 1), (1, 2)]


def test_a_failed_round_is_retried_and_the_failure_recorded(tmp_path):
    config = RunConfig(clients=2, rounds=3, min_clients=2, on_round_timeout="retry", out=str(tmp_path / "run"))
    run_dir = federate(config, nodes=2, crash_once=[(2, 2)])
    metrics = run_dir.read_metrics()
    assert metrics["status"] == "completed" and [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    (attempt,) = metrics["failed_attempts"]
    assert attempt["round"] == 2 and attempt["attempt"] == 1
    assert "round 2 got 1 usable update(s) of 2 sent; at least 2 needed" in attempt["error"]
    assert "node 2: RuntimeError: out of memory" in attempt["error"]
    assert metrics["rounds"][1]["num_clients"] == 2  # the retry got both updates


def test_stop_keeps_the_last_checkpoint_and_resume_finishes_the_run(tmp_path):
    config = RunConfig(clients=2, rounds=3, min_clients=2, out=str(tmp_path / "run"))  # on_round_timeout="stop"
    with pytest.raises(RunFailed, match="round 2 got 1 usable.*the checkpoint of round 1 is kept: resume"):
        federate(config, nodes=2, crash_once=[(2, 2)])
    run_dir = RunDir(config.out)
    metrics = run_dir.read_metrics()
    assert metrics["status"] == "failed" and "out of memory" in metrics["error"]
    assert [r["round"] for r in metrics["rounds"]] == [1] and load_checkpoint(run_dir.path).round == 1

    federate(resume_config(run_dir.path), nodes=2)  # the client is back
    metrics = run_dir.read_metrics()
    assert metrics["status"] == "completed" and "error" not in metrics
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3] and len(metrics["failed_attempts"]) == 1


def test_a_client_gone_for_good_skips_evaluation_then_stops_the_run_with_its_checkpoint(tmp_path):
    """min_clients unset: every client is needed. Node 2 dies while training in round 1."""
    config = RunConfig(clients=2, rounds=3, round_timeout=1, out=str(tmp_path / "run"))
    with pytest.raises(RunFailed, match=r"round 2: only 1 node\(s\) connected, 2 needed.*checkpoint of round 1 is kept"):
        federate(config, nodes=2, die_in_round={2: 1})
    metrics = RunDir(config.out).read_metrics()
    (round1,) = metrics["rounds"]  # trained on the one reply, kept, but not evaluated
    assert round1["num_clients"] == 1 and round1["eval_loss"] is None
    assert "evaluation skipped: round 1 evaluation: only 1 node(s) connected" in round1["failures"][-1]["reason"]
    assert load_checkpoint(config.out).round == 1 and metrics["status"] == "failed"
