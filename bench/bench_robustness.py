"""Final accuracy of every built-in strategy on digits with 10 clients, clean and with 2 sign-flipping
(×10) attackers, each on its own (fedweights' norm screens off), plus FedAvg behind update
validation under the same attack (max_norm; the default screens) and under a ×10⁶ scaling attack
(the default screens, and off), with 10 clients and with 2 (one attacker: too few updates for the
median screen, the model-relative one judges; under --dp, where that one is off, the DP-SGD bound
judges: on, off, and the same run without the attacker).

The test suite asserts the headline (median within 0.05 of clean FedAvg, FedAvg collapses); this
records the whole table side by side in one run.
"""

from __future__ import annotations

import tempfile
import time

from rich.console import Console

from fedweights import RunConfig, simulate
from fedweights.config import AttackConfig, DPConfig, StrategyConfig
from fedweights.errors import RunFailed
from fedweights.progress import RichReporter
from fedweights.strategies import BUILTINS

ROUNDS, LOCAL_EPOCHS, CLIENTS = 4, 2, 10
ATTACK = AttackConfig(malicious=2, kind="sign-flip", scale=10.0)
SCALING = AttackConfig(malicious=2, kind="scale", scale=1e6)
SCALING_ONE = AttackConfig(malicious=1, kind="scale", scale=1e6)
SCREENS_OFF = {"max_norm_ratio": 0, "max_model_norm_ratio": 0}
DP = DPConfig(enabled=True, noise_multiplier=1.0)


def _run(strategy: StrategyConfig, attack: AttackConfig, clients: int, dp: DPConfig = DPConfig()) -> dict:
    return {"strategy": strategy, "attack": attack, "clients": clients, "dp": dp}


def scenarios() -> dict[str, dict]:
    """Name → the RunConfig settings (strategy, attack, clients, dp) of every run."""
    runs: dict[str, dict] = {}
    for name in BUILTINS:
        strategy = StrategyConfig(name=name, byzantine=2 if "krum" in name else 0, **SCREENS_OFF)
        runs[f"{name}/clean"] = _run(strategy, AttackConfig(), CLIENTS)
        runs[f"{name}/sign-flip"] = _run(strategy, ATTACK, CLIENTS)
    runs["fedavg+max_norm=5/sign-flip"] = _run(StrategyConfig(max_norm=5.0, **SCREENS_OFF), ATTACK, CLIENTS)
    runs["fedavg+default/sign-flip"] = _run(StrategyConfig(), ATTACK, CLIENTS)
    runs["fedavg+default/scale"] = _run(StrategyConfig(), SCALING, CLIENTS)
    runs["fedavg/scale"] = _run(StrategyConfig(**SCREENS_OFF), SCALING, CLIENTS)
    runs["fedavg+default/2 clients, 1 scaling"] = _run(StrategyConfig(), SCALING_ONE, 2)
    runs["fedavg/2 clients, 1 scaling"] = _run(StrategyConfig(**SCREENS_OFF), SCALING_ONE, 2)
    runs["fedavg+default/dp, 2 clients, 1 scaling"] = _run(StrategyConfig(), SCALING_ONE, 2, DP)
    no_bound = StrategyConfig(dp_update_bound=False)
    runs["fedavg+no dp_update_bound/dp, 2 clients, 1 scaling"] = _run(no_bound, SCALING_ONE, 2, DP)
    runs["fedavg+default/dp, 2 clients, clean"] = _run(StrategyConfig(), AttackConfig(), 2, DP)
    return runs


def run() -> dict:
    results = {}
    quiet = RichReporter(Console(quiet=True))
    for label, settings in scenarios().items():
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            config = RunConfig(rounds=ROUNDS, local_epochs=LOCAL_EPOCHS, out=out, **settings)
            try:
                result = simulate(config, reporter=quiet)
            except RunFailed as failure:  # e.g. every update NaN after an absurd one was averaged in
                results[label] = {"failed": str(failure)[:300], "wall_s": round(time.perf_counter() - started, 1)}
                continue
        results[label] = {
            "final_accuracy": round(result.final_accuracy, 4),
            "accuracy_by_round": [round(r.eval_accuracy, 4) for r in result.rounds],
            "updates_used_last_round": result.rounds[-1].num_clients,
            "wall_s": round(time.perf_counter() - started, 1),
        }
    return {
        "benchmark": "robustness",
        "setup": f"digits, {CLIENTS} clients IID (2 where the name says so), {ROUNDS} rounds x {LOCAL_EPOCHS} local epochs; "
        f"attacks: {ATTACK}, {SCALING}; 'dp' rows: {DP}",
        "results": results,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
