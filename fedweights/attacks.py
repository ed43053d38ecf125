"""Simulated misbehaving clients, for evaluating robust strategies and update validation.

With ``[attack] malicious = K`` the clients holding partitions 0..K-1 attack (deterministic, so
runs are comparable); the others are honest. ``kind`` is one of

- ``sign-flip``:  reply ``w_global - scale·Δ`` (the honest update Δ = w_trained - w_global reversed and scaled),
- ``scale``:      reply ``w_global + scale·Δ``,
- ``gaussian``:   reply ``w_global + N(0, scale²)`` per coordinate (no training signal at all),
- ``label-flip``: train honestly on poisoned labels ``y → C-1-y`` (C classes).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from torch.utils.data import Dataset

from .config import AttackConfig
from .data import labels_of

UPDATE_ATTACKS = ("sign-flip", "scale", "gaussian")


def is_malicious(attack: AttackConfig, partition_id: int) -> bool:
    """Whether the client holding ``partition_id`` attacks."""
    return partition_id < attack.malicious


def poison_labels(attack: AttackConfig, partition_id: int, data: Dataset, all_train: Dataset) -> Dataset:
    """The client's training ``data``, with flipped labels when it runs a label-flip attack
    (the number of classes is read from ``all_train``, the whole training set)."""
    if attack.kind != "label-flip" or not is_malicious(attack, partition_id):
        return data
    return FlippedLabels(data, int(labels_of(all_train).max()) + 1)


def tamper_update(
    attack: AttackConfig,
    partition_id: int,
    global_arrays: ArrayRecord,
    trained: dict[str, torch.Tensor],
    seed: int,
) -> dict[str, torch.Tensor]:
    """The state a client replies with: ``trained``, or the attacked version for an update attack."""
    if attack.kind not in UPDATE_ATTACKS or not is_malicious(attack, partition_id):
        return trained
    generator = torch.Generator().manual_seed(seed)
    start = global_arrays.to_torch_state_dict()
    out = {}
    for key, weights in trained.items():
        if not weights.is_floating_point():
            out[key] = weights
            continue
        base = start[key].to(weights.dtype)
        if attack.kind == "gaussian":
            out[key] = base + attack.scale * torch.randn(weights.shape, generator=generator, dtype=weights.dtype)
        else:
            factor = -attack.scale if attack.kind == "sign-flip" else attack.scale
            out[key] = base + factor * (weights - base)
    return out


class FlippedLabels(Dataset):
    """A view of ``data`` whose labels are mapped ``y → num_classes - 1 - y``."""

    def __init__(self, data: Dataset, num_classes: int) -> None:
        self.data = data
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        x, y = self.data[index]
        return x, self.num_classes - 1 - y
