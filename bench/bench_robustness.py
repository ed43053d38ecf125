"""Final accuracy of every built-in strategy on digits with 10 clients, clean and with 2 sign-flipping
(×10) attackers, each on its own (the median-relative norm screen off), plus FedAvg behind update
validation under the same attack (max_norm; the default max_norm_ratio) and under a ×10⁶ scaling
attack (the default max_norm_ratio, and off).

The test suite asserts the headline (median within 0.05 of clean FedAvg, FedAvg collapses); this
records the whole table side by side in one run.
"""

from __future__ import annotations

import tempfile
import time

from rich.console import Console

from fedweights import RunConfig, simulate
from fedweights.config import AttackConfig, StrategyConfig
from fedweights.progress import RichReporter
from fedweights.strategies import BUILTINS

ROUNDS, LOCAL_EPOCHS, CLIENTS = 4, 2, 10
ATTACK = AttackConfig(malicious=2, kind="sign-flip", scale=10.0)
SCALING = AttackConfig(malicious=2, kind="scale", scale=1e6)


def scenarios() -> dict[str, tuple[StrategyConfig, AttackConfig]]:
    """Name → (strategy, attack) of every run."""
    runs: dict[str, tuple[StrategyConfig, AttackConfig]] = {}
    for name in BUILTINS:
        strategy = StrategyConfig(name=name, byzantine=2 if "krum" in name else 0, max_norm_ratio=0)
        runs[f"{name}/clean"] = (strategy, AttackConfig())
        runs[f"{name}/sign-flip"] = (strategy, ATTACK)
    runs["fedavg+max_norm=5/sign-flip"] = (StrategyConfig(max_norm=5.0, max_norm_ratio=0), ATTACK)
    runs["fedavg+default/sign-flip"] = (StrategyConfig(), ATTACK)
    runs["fedavg+default/scale"] = (StrategyConfig(), SCALING)
    runs["fedavg/scale"] = (StrategyConfig(max_norm_ratio=0), SCALING)
    return runs


def run() -> dict:
    results = {}
    quiet = RichReporter(Console(quiet=True))
    for label, (strategy, attack) in scenarios().items():
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            config = RunConfig(clients=CLIENTS, rounds=ROUNDS, local_epochs=LOCAL_EPOCHS, strategy=strategy, attack=attack, out=out)
            result = simulate(config, reporter=quiet)
        results[label] = {
            "final_accuracy": round(result.final_accuracy, 4),
            "accuracy_by_round": [round(r.eval_accuracy, 4) for r in result.rounds],
            "updates_used_last_round": result.rounds[-1].num_clients,
            "wall_s": round(time.perf_counter() - started, 1),
        }
    return {
        "benchmark": "robustness",
        "setup": f"digits, {CLIENTS} clients IID, {ROUNDS} rounds x {LOCAL_EPOCHS} local epochs; attacks: {ATTACK}, {SCALING}",
        "results": results,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
