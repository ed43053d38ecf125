"""Helpers shared by the encrypted-aggregation tests."""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord


def model_states(count: int, seed: int, scale: float = 0.5) -> list[dict[str, torch.Tensor]]:
    """``count`` state_dicts of a small two-tensor model (≈20k values: three ciphertexts)."""
    g = torch.Generator().manual_seed(seed)
    return [
        {"fc.weight": torch.randn(200, 100, generator=g) * scale, "fc.bias": torch.randn(200, generator=g) * scale}
        for _ in range(count)
    ]


def replace_entry(record: ArrayRecord, key: str, data: bytes) -> ArrayRecord:
    """A copy of ``record`` with entry ``key`` holding ``data``."""
    entries = {k: Array(dtype="bytes", shape=(len(v.data),), stype=v.stype, data=v.data) for k, v in record.items()}
    entries[key] = Array(dtype="bytes", shape=(len(data),), stype="raw", data=data)
    return ArrayRecord(entries)


def copy_record(record: ArrayRecord, drop: str) -> ArrayRecord:
    """A copy of ``record`` without entry ``drop``."""
    return ArrayRecord({k: v for k, v in record.items() if k != drop})
