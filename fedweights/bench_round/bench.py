"""Wall time per round: fedweights versus a stock Flower FedAvg app, on one local federation.

Both apps run with ``flwr run`` on the same SuperLink and SuperNodes (Flower's deployment engine,
loopback, 2 nodes), alternating, with the same model (fedweights' MLP), data (digits partitions),
local epochs, batch size and learning rate, no DP and no HE. fedweights' per-round ``seconds`` come
from its metrics.json; the stock ServerApp (``bench/stock_flower_app``) times the same span
(``configure_train`` to the end of ``aggregate_evaluate``) and adds the clients' own timestamps,
which split a round into dispatch, ClientApp process start-up, work and return.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..config import RunConfig
from ..deploy.federation import write_app_dir
from ..errors import UserError
from .federation import LocalFederation

TARGET_RATIO = 1.1
CLIENTS = 2
STOCK_APP = Path(__file__).resolve().parents[2] / "bench" / "stock_flower_app"

def run(rounds: int = 3, repeats: int = 2, workdir: Path | None = None) -> dict:
    """Run both apps ``repeats`` times each (alternating) for ``rounds`` rounds; return the results."""
    if rounds < 1 or repeats < 1:
        raise UserError("--rounds and --repeats must be >= 1")
    if not (STOCK_APP / "pyproject.toml").is_file():
        raise UserError(f"the stock Flower app is missing at {STOCK_APP}; run from a fedweights source checkout")
    with tempfile.TemporaryDirectory(prefix="fedweights-bench-round-") as tmp:
        work = Path(workdir or tmp)
        fedweights_runs, stock_runs = [], []
        started = time.monotonic()
        with LocalFederation(work / "federation", nodes=CLIENTS) as federation:
            up_s = time.monotonic() - started
            for repeat in range(repeats):
                order = (_run_fedweights, _run_stock) if repeat % 2 == 0 else (_run_stock, _run_fedweights)
                for runner in order:
                    result = runner(federation, work / f"repeat-{repeat}", rounds)
                    (fedweights_runs if runner is _run_fedweights else stock_runs).append(result)
        imports = {"fedweights": _cold_import("fedweights.flower.client_app", None),
                   "stock_flower": _cold_import("stock_flower.client_app", STOCK_APP)}  # fmt: skip
    return _summarise(rounds, repeats, up_s, fedweights_runs, stock_runs, imports)


def _run_fedweights(federation: LocalFederation, work: Path, rounds: int) -> dict:
    app, out = work / "fedweights-app", work / "fedweights-run"
    write_app_dir(app, RunConfig(clients=CLIENTS, rounds=rounds, device="cpu", out=str(out)))
    wall, _ = federation.run_app(app)
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "seconds": [r["seconds"] for r in metrics["rounds"]],
        "eval_accuracy": [r["eval_accuracy"] for r in metrics["rounds"]],
        "run_wall_s": round(wall, 2),
    }


def _run_stock(federation: LocalFederation, work: Path, rounds: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    timing = work / "stock-rounds.json"
    wall, _ = federation.run_app(STOCK_APP, run_config=f"num-server-rounds={rounds} timing-file='{timing}'")
    records = json.loads(timing.read_text())
    if len(records) != rounds:
        raise UserError(f"the stock Flower app finished {len(records)} of {rounds} rounds; see {work}")
    return {
        "seconds": [r["seconds"] for r in records],
        "eval_accuracy": [r["eval_accuracy"] for r in records],
        "run_wall_s": round(wall, 2),
        "timeline": records,
    }


def _cold_import(module: str, path: Path | None) -> float:
    """Seconds a fresh interpreter needs to import a ClientApp module (what every message pays)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    env = {**os.environ, **({"PYTHONPATH": str(path)} if path else {})}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0:
        raise UserError(f"importing {module} failed: {result.stderr[-1000:]}")
    return round(float(result.stdout.strip().splitlines()[-1]), 3)


def _summarise(rounds, repeats, up_s, fedweights_runs, stock_runs, imports) -> dict:
    ours = [s for run_ in fedweights_runs for s in run_["seconds"]]
    theirs = [s for run_ in stock_runs for s in run_["seconds"]]
    ratio = statistics.mean(ours) / statistics.mean(theirs)
    breakdown = round_breakdown([r for run_ in stock_runs for r in run_["timeline"]])
    for run_ in stock_runs:
        run_.pop("timeline")
    return {
        "benchmark": "round",
        "description": "wall seconds per federated round on Flower's deployment engine (loopback, "
        f"{CLIENTS} SuperNodes, digits MLP, 1 local epoch, no DP/HE): fedweights vs stock Flower FedAvg",
        "rounds": rounds,
        "repeats": repeats,
        "clients": CLIENTS,
        "federation_start_s": round(up_s, 2),
        "setups": {
            "fedweights": _setup(fedweights_runs, ours),
            "stock_flower": _setup(stock_runs, theirs),
        },
        "ratio": round(ratio, 3),
        "ratio_median": round(statistics.median(ours) / statistics.median(theirs), 3),
        # same model, data and training: both apps must end on the same global model
        "same_final_accuracy": len({r["eval_accuracy"][-1] for r in fedweights_runs + stock_runs}) == 1,
        "target": f"fedweights <= {TARGET_RATIO}x stock Flower (mean seconds per round)",
        "met": ratio <= TARGET_RATIO,
        "breakdown": breakdown,
        "client_import_s": imports,
        "machine": {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]},
    }


def _setup(runs: list[dict], seconds: list[float]) -> dict:
    return {
        "seconds_per_round": [round(s, 3) for s in seconds],
        "mean_s": round(statistics.mean(seconds), 3),
        "median_s": round(statistics.median(seconds), 3),
        "run_wall_s": [r["run_wall_s"] for r in runs],
        "final_eval_accuracy": [r["eval_accuracy"][-1] for r in runs],
    }


def round_breakdown(records: list[dict]) -> dict:
    """Mean seconds of each part of a round's two message exchanges (train, evaluate).

    For each exchange and node: ``dispatch`` (server sends → the node's ClientApp process exists:
    SuperNode poll, SuperExec task poll, process spawn), ``startup`` (process start → handler runs:
    interpreter, imports incl. ``import_s``, fetching the message), ``work`` (the handler; ``train_s``
    is the training loop alone) and ``return`` (handler done → the ServerApp holds every reply).
    ``flower_startup`` is start-up minus the app's own imports: interpreter, flwr, fetching the app and message.
    """
    parts: dict[str, dict[str, list[float]]] = {}
    for record in records:
        for kind, sent, back in (("train", "t_train_sent", "t_train_back"), ("evaluate", "t_eval_sent", "t_eval_back")):
            bucket = parts.setdefault(kind, {})
            for node in record[kind]:
                values = {
                    "dispatch": node["t_process"] - record[sent],
                    "startup": node["t_handler"] - node["t_process"],
                    "import_s": node["import_s"],  # part of startup: torch + the app module
                    "flower_startup": node["t_handler"] - node["t_process"] - node["import_s"],
                    "work": node["t_done"] - node["t_handler"],
                    "return": record[back] - node["t_done"],
                }
                if "train_s" in node:
                    values["train_s"] = node["train_s"]
                for key, value in values.items():
                    bucket.setdefault(key, []).append(value)
            bucket.setdefault("exchange", []).append(record[back] - record[sent])
    means = {kind: {k: round(statistics.mean(v), 3) for k, v in bucket.items()} for kind, bucket in parts.items()}
    totals = {p: round(sum(means[k][p] for k in means), 3) for p in ("dispatch", "startup", "work", "return")}
    return {
        "per_exchange": means,
        "per_round": totals,
        "dominant": max(totals, key=totals.get),
        "note": "from the stock Flower app's timestamps; both apps go through the same Flower path "
        "(a fresh flwr-clientapp process per message), so they share dispatch/startup/return costs",
    }
