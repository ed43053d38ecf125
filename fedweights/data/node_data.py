"""A node's own data for ``fedweights client --data FILE.npz``.

The file holds NumPy arrays ``x_train`` (examples × features, float) and ``y_train`` (integer
class labels), and optionally ``x_test``/``y_test`` for evaluation; features must match the
run's model (the built-in ``digits`` MLP takes 64 values in [0, 1], 10 classes).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import UserError


@lru_cache(maxsize=2)
def load_node_data(path: str) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets from an ``.npz`` file; test is empty when the file has none."""
    try:
        arrays = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read node data {path}: {exc} (expected an .npz with x_train, y_train)") from None
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing:
        raise UserError(f"node data {path} lacks {', '.join(missing)} (expected x_train, y_train[, x_test, y_test])")
    train = _dataset(path, arrays["x_train"], arrays["y_train"])
    if "x_test" in arrays and "y_test" in arrays:
        return train, _dataset(path, arrays["x_test"], arrays["y_test"])
    return train, _dataset(path, arrays["x_train"][:0], arrays["y_train"][:0])


def _dataset(path: str, x: np.ndarray, y: np.ndarray) -> TensorDataset:
    if len(x) != len(y):
        raise UserError(f"node data {path}: {len(x)} examples but {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"node data {path}: labels must be integers, got {y.dtype}")
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))
