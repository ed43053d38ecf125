"""How much each tensor changed between two safetensors files: L2 norm of the change and its size
relative to the old tensor (``||b - a|| / ||a||``).

Tensors with equal sha256 are reported unchanged without an element-wise comparison; tensors are
loaded one at a time and reduced in float64 blocks, so memory stays near two copies of the
largest tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from .payload import digest_file

if TYPE_CHECKING:  # tensors come from safe_open(framework="pt"), which imports torch when a diff runs
    import torch

BLOCK = 1 << 22  # elements per float64 block


@dataclass(frozen=True)
class TensorChange:
    """One tensor's change from ``a`` to ``b``.

    ``status``: ``same`` | ``changed`` | ``added`` (only in b) | ``removed`` (only in a) |
    ``reshaped`` (dtype or shape differ: no norm). ``relative_change`` is ``inf`` when
    ``a`` is all zeros and ``b`` is not.
    """

    name: str
    status: str
    shape: tuple[int, ...]
    l2_change: float | None = None
    l2_before: float | None = None
    relative_change: float | None = None


def diff_files(a: str | Path, b: str | Path) -> list[TensorChange]:
    """Per-tensor changes from file ``a`` to file ``b`` (both safetensors), in ``b``'s order."""
    before = {t.name: t for t in digest_file(a).tensors}
    after = {t.name: t for t in digest_file(b).tensors}
    changes = []
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        for name, new in after.items():
            old = before.get(name)
            if old is None:
                changes.append(TensorChange(name, "added", new.shape))
            elif (old.dtype, old.shape) != (new.dtype, new.shape):
                changes.append(TensorChange(name, "reshaped", new.shape))
            elif old.sha256 == new.sha256:
                norm = _l2(fa.get_tensor(name)) if old.size_bytes else 0.0
                changes.append(TensorChange(name, "same", new.shape, 0.0, norm, 0.0))
            else:
                changes.append(_change(name, fa.get_tensor(name), fb.get_tensor(name)))
    changes += [TensorChange(name, "removed", t.shape) for name, t in before.items() if name not in after]
    return changes


def total_change(changes: list[TensorChange]) -> tuple[float, float | None]:
    """L2 change and relative change of the whole model (over tensors present in both)."""
    compared = [c for c in changes if c.l2_change is not None]
    change = math.sqrt(sum(c.l2_change**2 for c in compared))
    before = math.sqrt(sum(c.l2_before**2 for c in compared))
    return change, _relative(change, before)


def _change(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorChange:
    change_sq = before_sq = 0.0
    for block_a, block_b in _blocks(a, b):
        change_sq += float(((block_b - block_a) ** 2).sum())
        before_sq += float((block_a**2).sum())
    change, before = math.sqrt(change_sq), math.sqrt(before_sq)
    return TensorChange(name, "changed", tuple(a.shape), change, before, _relative(change, before))


def _l2(tensor: torch.Tensor) -> float:
    return math.sqrt(sum(float((block**2).sum()) for (block,) in _blocks(tensor)))


def _blocks(*tensors: torch.Tensor):
    """Matching float64 blocks of the flattened tensors."""
    flats = [t.reshape(-1) for t in tensors]
    for start in range(0, flats[0].numel(), BLOCK):
        yield [f[start : start + BLOCK].double() for f in flats]


def _relative(change: float, before: float) -> float | None:
    if before > 0:
        return change / before
    return 0.0 if change == 0 else math.inf
