"""End-to-end runs on Flower's simulation engine (Ray): real ServerApp, ClientApps, files on disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

import pytest
from safetensors.torch import load_file

from fedweights.config import RunConfig
from fedweights.task import builtin_task

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_cli_two_clients_one_round_writes_metrics_and_model(cli, tmp_path):
    out = tmp_path / "run"
    # The default path: simulate starts (and stops) its own private Ray instance.
    result = cli("simulate", "--clients", "2", "--rounds", "1", "--no-dp", "--no-he", "--out", str(out), env={"FEDWEIGHTS_RAY_ADDRESS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "round 1/1" in result.stdout and "eval_accuracy" in result.stdout  # progress + table
    assert "DEPRECATED FEATURE" not in result.stderr  # Flower's 'use flwr run' notice is not for simulate's users

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["config"]["clients"] == 2 and metrics["config"]["rounds"] == 1
    (record,) = metrics["rounds"]
    assert set(record) >= {"round", "train_loss", "eval_loss", "eval_accuracy", "num_clients", "seconds"}
    assert record["round"] == 1 and record["num_clients"] == 2 and record["seconds"] > 0
    assert 0 < record["train_loss"] < 3 and 0 < record["eval_loss"] < 3
    assert 0.2 < record["eval_accuracy"] <= 1.0  # better than chance (0.1) after one round

    state = load_file(str(out / "model.safetensors"))
    model = builtin_task(RunConfig()).model_fn()
    model.load_state_dict(state)  # the saved model is the default model's full state


def test_default_federation_reaches_ninety_percent(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("simulate", "--no-dp", "--no-he", "--clients", "4", "--rounds", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    assert rounds[-1]["eval_accuracy"] >= 0.90
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]


def test_python_api_with_own_model_and_dataset(tmp_path):
    """The README's bring-your-own-model example runs as documented."""
    example = REPO / "examples" / "custom_model.py"
    result = subprocess.run([sys.executable, str(example), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed" and len(metrics["rounds"]) == 3
    assert metrics["rounds"][-1]["eval_accuracy"] > 0.85
    assert set(load_file(str(tmp_path / "model.safetensors"))) == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"}
    assert not (tmp_path / ".task.pkl").exists()


def test_is_a_valid_flower_app(tmp_path):
    """`flwr build` accepts the repo's [tool.flwr.app] and bundles the components it names."""
    app_dir = tmp_path / "app"  # the repo's pyproject + package, without .venv and run outputs
    app_dir.mkdir()
    shutil.copy(REPO / "pyproject.toml", app_dir)
    shutil.copytree(REPO / "fedweights", app_dir / "fedweights", ignore=shutil.ignore_patterns("__pycache__"))
    flwr = [sys.executable, "-c", "from flwr.cli.app import app; app()"]
    result = subprocess.run([*flwr, "build", "--app", str(app_dir)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    assert "fedweights/flower/server_app.py" in names and "fedweights/flower/client_app.py" in names

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from fedweights.flower.client_app import app as client_app
    from fedweights.flower.server_app import app as server_app

    assert isinstance(server_app, ServerApp) and isinstance(client_app, ClientApp)
