"""Wall time per federated round: fedweights versus a stock Flower FedAvg app on the same local
federation (Flower's deployment engine, 2 SuperNodes on loopback). Same code as
`fedweights bench round`; target: fedweights <= 1.1x stock Flower."""

from __future__ import annotations

from fedweights.bench_round.bench import run as _run


def run() -> dict:
    return _run(rounds=3, repeats=2)
