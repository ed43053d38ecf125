"""The round benchmark's parts: the local Flower federation it launches, the stock Flower app it
compares against, and how it splits a round into dispatch / start-up / work / return."""

from __future__ import annotations

import sys
import urllib.request

import pytest

from fedweights.bench_round.bench import STOCK_APP, round_breakdown
from fedweights.bench_round.federation import FEDERATION, LocalFederation, free_port


def _node(t_process, t_handler, t_done, **extra):
    return {"t_process": t_process, "t_handler": t_handler, "t_done": t_done, "import_s": 2.0, **extra}


def test_round_breakdown_splits_each_exchange():
    record = {
        "t_train_sent": 100.0,
        "train": [_node(101.0, 105.0, 107.0, train_s=1.5), _node(102.0, 105.0, 108.0, train_s=2.5)],
        "t_train_back": 110.0,
        "t_eval_sent": 110.0,
        "evaluate": [_node(111.0, 114.0, 114.5), _node(111.0, 115.0, 115.5)],
        "t_eval_back": 116.0,
    }
    result = round_breakdown([record])
    train = result["per_exchange"]["train"]
    assert train["dispatch"] == 1.5 and train["startup"] == 3.5 and train["work"] == 2.5 and train["return"] == 2.5
    assert train["train_s"] == 2.0 and train["exchange"] == 10.0
    evaluate = result["per_exchange"]["evaluate"]
    assert evaluate == {
        "dispatch": 1.0, "startup": 3.5, "import_s": 2.0, "flower_startup": 1.5, "work": 0.5, "return": 1.0, "exchange": 6.0
    }  # fmt: skip
    assert result["per_round"] == {"dispatch": 2.5, "startup": 7.0, "work": 3.0, "return": 3.5}
    assert result["dominant"] == "startup"


def test_stock_flower_app_declares_real_components():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    declared = tomllib.loads((STOCK_APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    sys.path.insert(0, str(STOCK_APP))
    try:
        from flwr.clientapp import ClientApp
        from flwr.serverapp import ServerApp
        from stock_flower import client_app, server_app
    finally:
        sys.path.remove(str(STOCK_APP))
    assert declared["components"] == {"serverapp": "stock_flower.server_app:app", "clientapp": "stock_flower.client_app:app"}
    assert isinstance(server_app.app, ServerApp) and isinstance(client_app.app, ClientApp)
    assert {"num-server-rounds", "timing-file", "num-partitions"} <= declared["config"].keys()


@pytest.mark.slow
@pytest.mark.deploy  # real Flower processes, no Ray
def test_local_federation_starts_healthy_and_leaves_nothing_behind(tmp_path):
    with LocalFederation(tmp_path, nodes=2) as federation:
        assert len(federation.processes) == 3
        url = f"http://127.0.0.1:{federation.superlink_port}/health"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
        config = (federation.home / "config.toml").read_text()
        assert f"[superlink.{FEDERATION}]" in config and f"127.0.0.1:{federation.superlink_port}" in config
        processes = [p for _, p in federation.processes]
    assert all(p.poll() is not None for p in processes)
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
