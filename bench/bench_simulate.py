"""Wall time of a simulated federation: start-up (Ray) versus per-round cost, for 4 and 10 clients."""

from __future__ import annotations

import tempfile
import time

from fedweights import RunConfig, simulate


def run() -> dict:
    results = {}
    for clients in (4, 10):
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            result = simulate(RunConfig(clients=clients, rounds=5, out=out))
            total = time.perf_counter() - started
        rounds = [r.seconds for r in result.rounds]
        results[f"clients_{clients}"] = {
            "total_s": round(total, 2),
            "first_round_s": rounds[0],
            "later_round_mean_s": round(sum(rounds[1:]) / len(rounds[1:]), 3),
            "final_accuracy": result.final_accuracy,
        }
    return {"benchmark": "simulate", "results": results}
