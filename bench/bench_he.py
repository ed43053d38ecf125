"""Encrypted aggregation: fedweights (BFV, client-weighted, server adds) versus NVIDIA FLARE's
TenSEAL setup (CKKS N=8192 [60,40,40], server multiplies by weights), side by side on the same
10 client updates of 1M parameters. Same code as `fedweights bench he`."""

from __future__ import annotations

from fedweights.crypto.bench import run as _run


def run() -> dict:
    return _run(params=1_000_000, clients=10)
