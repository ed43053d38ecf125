"""Nodes that bring their own data (`fedweights client --data FILE.npz`): a wrong file fails with a
message naming it, at client start-up or in its round (never taking the round down), and a node's
ledger/report id is its stable name, not Flower's per-connection node id; two nodes sent with one
partition id are flagged and their privacy spends composed."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from fedweights.config import DPConfig, RunConfig
from fedweights.data.node_data import load_node_data
from fedweights.deploy.client import NodeSettings
from fedweights.errors import UserError
from fedweights.flower.round_loop import run_federation
from fedweights.flower.runtime import NODE_DATA, NODE_NAME, Runtime
from fedweights.privacy.accounting import epsilon
from fedweights.privacy.ledger import Ledger
from fedweights.progress import RichReporter
from fedweights.run_dir import RunDir
from fedweights.task import builtin_task

from .local_grid import LocalGrid, node_configs

GOOD = {"x_train": np.random.default_rng(0).random((20, 64)), "y_train": np.arange(20) % 10}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x_train": GOOD["x_train"]}, "lacks y_train"),
        ({**GOOD, "y_train": GOOD["y_train"][:19]}, "x_train has 20 examples but y_train 19 labels"),
        ({**GOOD, "y_train": GOOD["y_train"].astype(float)}, "integer class labels"),
        ({**GOOD, "y_train": -GOOD["y_train"]}, "negative label"),
        ({**GOOD, "x_train": np.full((20, 64), np.nan)}, "NaN or infinite"),
        ({**GOOD, "x_train": np.array(["a"] * 20)}, "numeric array of examples × features"),
        ({**GOOD, "x_test": GOOD["x_train"]}, "only one of x_test, y_test"),
        ({**GOOD, "x_test": GOOD["x_train"][:, :8], "y_test": GOOD["y_train"]}, "x_test examples have shape (8,)"),
        ({"x_train": GOOD["x_train"][:0], "y_train": GOOD["y_train"][:0]}, "holds no examples"),
    ],
)
def test_a_malformed_file_is_refused_with_what_is_wrong(tmp_path, arrays, message):
    path = tmp_path / "node.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_node_data(str(path))


def test_a_file_that_is_not_npz_or_holds_pickles_is_refused(tmp_path):
    (tmp_path / "notes.npz").write_text("not numpy")  # numpy itself would talk of pickles here
    with pytest.raises(UserError, match="node data .*notes.npz is not an .npz archive"):
        load_node_data(str(tmp_path / "notes.npz"))
    np.savez(tmp_path / "objects.npz", x_train=np.array([{"a": 1}] * 2, dtype=object), y_train=np.arange(2))
    with pytest.raises(UserError, match="cannot read node data .*allow_pickle"):
        load_node_data(str(tmp_path / "objects.npz"))


def test_client_refuses_a_bad_file_before_it_connects(cli, tmp_path):
    np.savez(tmp_path / "bad.npz", x_train=GOOD["x_train"])
    result = cli("client", "--server", "127.0.0.1:9", "--insecure", "--data", str(tmp_path / "bad.npz"),
                 "--state-dir", str(tmp_path / "state"))
    assert result.returncode != 0
    assert "lacks y_train" in result.stdout + result.stderr
    assert "SuperNode connecting" not in result.stdout  # it never started one


def test_a_node_gets_one_source_of_data_and_a_file_not_a_folder(tmp_path):
    np.savez(tmp_path / "good.npz", **GOOD)
    with pytest.raises(UserError, match="not both"):
        NodeSettings(partition="0/2", data=tmp_path / "good.npz").node_config("n1")
    with pytest.raises(UserError, match="is a folder, not a .npz file"):
        NodeSettings(data=tmp_path).node_config("n1")


@pytest.mark.usefixtures("serverapp_process")
def test_own_data_nodes_train_under_their_names_and_a_misfit_file_fails_only_its_node(tmp_path):
    config = RunConfig(clients=3, rounds=2, min_clients=2, seed=3, out=str(tmp_path / "run"),
                       dp=DPConfig(enabled=True, noise_multiplier=1.0))
    shard = builtin_task(config).client_data(1, 2, config).train  # digits examples this lab exports
    x, y = zip(*(shard[i] for i in range(len(shard))))
    np.savez(tmp_path / "lab.npz", x_train=np.stack(x), y_train=np.array(y))
    np.savez(tmp_path / "misfit.npz", x_train=np.stack(x)[:, :32], y_train=np.array(y))
    nodes = node_configs(2)
    nodes[2] = {NODE_DATA: str(tmp_path / "lab.npz"), NODE_NAME: "lab-b"}
    nodes[3] = {NODE_DATA: str(tmp_path / "misfit.npz"), NODE_NAME: "lab-c"}
    run_federation(LocalGrid(Runtime(config), nodes), Runtime(config), reporter=RichReporter())

    metrics = RunDir(config.out).read_metrics()
    assert metrics["status"] == "completed"
    for round_ in metrics["rounds"]:
        assert round_["num_clients"] == 2  # node 1 (partition 0) and lab-b trained
        (failure,) = round_["failures"]
        assert failure["node"] == "3" and "misfit.npz: examples of shape (32,) do not fit the model" in failure["reason"]
    ledger = Ledger(config.out).read()
    assert sorted({e["client"] for e in ledger}) == ["0", "lab-b"]
    lab_b = [e for e in ledger if e["client"] == "lab-b"]
    assert [e["n_examples"] for e in lab_b] == [len(shard)] * 2 and lab_b[-1]["epsilon"] > lab_b[0]["epsilon"]


@pytest.mark.usefixtures("serverapp_process")
def test_two_nodes_on_one_partition_id_are_flagged_and_their_spends_composed(tmp_path, caplog):
    """An operator starts two nodes with --partition 0/2: both train on the same examples, so the
    account of client 0 must hold both nodes' steps (never one node's) and say what happened."""
    config = RunConfig(clients=2, rounds=2, seed=3, out=str(tmp_path / "run"), dp=DPConfig(enabled=True, noise_multiplier=1.0))
    nodes = {1: node_configs(2)[1], 2: node_configs(2)[1]}  # both partition 0 of 2
    with caplog.at_level(logging.WARNING, logger="fedweights.privacy"):
        run_federation(LocalGrid(Runtime(config), nodes), Runtime(config), reporter=RichReporter())

    said = [r.getMessage() for r in caplog.records if r.name == "fedweights.privacy"]
    assert [m.split(":")[0] for m in said] == ["round 1", "round 2"]  # on the console, once per round
    assert all("nodes 1, 2 all sent client id 0" in m for m in said)
    ledger = Ledger(config.out).read()
    assert [e["client"] for e in ledger] == ["0"] * 4
    assert all("also came from node(s)" in e["warning"] for e in ledger)
    last = ledger[-1]
    assert sum(n for *_, n in last["history"]) == sum(e["steps"] for e in ledger)  # all four spends
    assert last["epsilon"] == pytest.approx(epsilon([tuple(h) for h in last["history"]], last["delta"], "pld"))
    client = json.loads((tmp_path / "run" / "privacy.json").read_text())["clients"]["0"]
    assert client["shared_id_rounds"] == [1, 2] and client["epsilon"] == pytest.approx(last["epsilon"])
